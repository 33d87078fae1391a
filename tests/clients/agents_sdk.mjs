// The OpenAI Agents SDK for JavaScript (`@openai/agents`) as a real Realtime client
// of hark. The agent declares one function tool of its own (`lookup_order`); hark's
// agent has `calculator`, which hark runs itself; the test's scripted model calls
// both in one response. Prints one line `RESULT {json}`: which tools the SDK ran,
// its history, and errors.
//   node agents_sdk.mjs --url ws://127.0.0.1:PORT/v1/realtime --final-text TEXT
import { RealtimeAgent, RealtimeSession, tool } from '@openai/agents/realtime';
import { z } from 'zod';

const arg = (name) => process.argv[process.argv.indexOf(name) + 1];
const url = arg('--url');
const finalText = arg('--final-text');

const ran = [];
const toolStarts = [];
const errors = [];
const transport = [];
let history = [];

const lookupOrder = tool({
  name: 'lookup_order',
  description: "Look up an order's status.",
  parameters: z.object({ order_id: z.string() }),
  execute: async ({ order_id }) => {
    ran.push('lookup_order');
    return JSON.stringify({ order_id, status: 'shipped' });
  },
});

const agent = new RealtimeAgent({ name: 'assistant', instructions: 'Help with orders.', tools: [lookupOrder] });
const session = new RealtimeSession(agent, { transport: 'websocket', model: 'hark', config: { outputModalities: ['text'] } });
session.on('transport_event', (e) => transport.push(e.type + (e.item ? ':' + e.item.type : '') + (e.error ? ':' + JSON.stringify(e.error) : '')));
session.on('agent_tool_start', (_ctx, _agent, t) => toolStarts.push(t.name));
session.on('error', (e) => errors.push(String(e?.error?.message ?? e?.error ?? e)));

const done = new Promise((resolve) => {
  session.on('history_updated', (h) => {
    history = h;
    const texts = h.filter((i) => i.type === 'message' && i.role === 'assistant').flatMap((i) => i.content.map((c) => c.text ?? c.transcript));
    if (texts.includes(finalText)) resolve(true);
  });
});

await session.connect({ apiKey: 'unused', url });
session.sendMessage('What is 6 times 7, and where is order A1?');
const ok = await Promise.race([done, new Promise((r) => setTimeout(() => r(false), 40000))]);
if (!ok) errors.push('no final answer within 40 s');
console.log('RESULT ' + JSON.stringify({
  ran,
  tool_starts: toolStarts,
  errors,
  transport,
  history: history.map((i) => ({ type: i.type, name: i.name, output: i.output, status: i.status, role: i.role })),
}));
session.close();
process.exit(0);
