// A real browser (Debian's headless Chromium, driven by playwright-core) calling hark
// the OpenAI Realtime WebRTC way. Used by tests/webrtc_browser.rs.
//
//   node webrtc_call.mjs MODE BASE_URL WAV Y4M OUT_DIR
//
// MODE:
//   openai   plain OpenAI-style page code: the "backend" (this script) mints a client
//            secret, the page posts its offer to /v1/realtime/calls with it and talks
//            on the `oai-events` data channel. The microphone track is attached only
//            once the call is connected, so hark's first audio is the WAV's start.
//   cycles   N connect/close cycles (N from env CYCLES): each opens a call, waits for
//            session.created on the data channel, then closes the peer connection.
//   page     hark's built-in page at `/`: press Start, wait for the model's answer,
//            save a screenshot.
//   vanish   opens a call, waits for session.created, then SIGKILLs the browser: the
//            peer goes away without a word (no DTLS close, no SCTP abort).
// Prints `RESULT {json}` as its last line.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

const [mode, base, wav, y4m, outDir] = process.argv.slice(2);
const waitMs = Number(process.env.WAIT_MS || 30000);

const args = [
  '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
  // %noloop: the WAV plays once, then silence, so its speech happens exactly once.
  `--use-file-for-fake-audio-capture=${wav}%noloop`,
  `--use-file-for-fake-video-capture=${y4m}`,
  // Without it Chromium offers no 127.0.0.1 candidates (DESIGN.md §6).
  '--allow-loopback-in-peer-connection',
  '--autoplay-policy=no-user-gesture-required',
];

async function mintSecret() {
  const r = await fetch(`${base}/v1/realtime/client_secrets`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ expires_after: { anchor: 'created_at', seconds: 60 }, session: { type: 'realtime', instructions: 'Answer briefly.' } }),
  });
  if (r.status !== 200) throw new Error(`client_secrets: ${r.status} ${await r.text()}`);
  return (await r.json()).value;
}

// Launched as a server so that `vanish` can kill the browser's process outright.

// One plain call from inside the page (mic + oai-events), as the cycles and vanish
// modes make it: resolves once session.created arrives (created: false after 10 s).
const OPEN_CALL = async () => {
  window.openCall = async (base, key) => {
    const pc = new RTCPeerConnection();
    const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    pc.addTrack(mic.getAudioTracks()[0], mic);
    const dc = pc.createDataChannel('oai-events');
    const created = new Promise((resolve) => dc.addEventListener('message', (e) => {
      if (JSON.parse(e.data).type === 'session.created') resolve(true);
    }));
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const r = await fetch(`${base}/v1/realtime/calls`, {
      method: 'POST', body: offer.sdp, headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/sdp' },
    });
    if (r.status !== 201) return { status: r.status, pc, mic };
    await pc.setRemoteDescription({ type: 'answer', sdp: await r.text() });
    const ok = await Promise.race([created, new Promise((res) => setTimeout(() => res(false), 10000))]);
    return { status: 201, created: ok, pc, mic };
  };
};
const server = await chromium.launchServer({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args });
const browser = await chromium.connect(server.wsEndpoint());
const result = { mode };
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  const console_ = [];
  page.on('console', (m) => console_.push(m.text()));
  if (mode === 'openai') {
    await page.goto(`${base}/healthz`);
    const key = await mintSecret();
    const holdMs = Number(process.env.HOLD_MS || 0);
    // AUDIO_OUT=1: the session asks for spoken answers (they come on hark's track).
    const audioOut = process.env.AUDIO_OUT === '1';
    // VIDEO_CODEC=h264: the camera is offered in H.264 only (setCodecPreferences).
    const videoCodec = process.env.VIDEO_CODEC || '';
    // CLEAR_ON_START=1: the page cuts the spoken answer off as soon as it starts playing.
    const clearOnStart = process.env.CLEAR_ON_START === '1';
    // The event the call waits for (then holds for HOLD_MS from its start).
    const until = process.env.UNTIL || 'response.done';
    Object.assign(result, await page.evaluate(async ({ base, key, waitMs, holdMs, audioOut, videoCodec, clearOnStart, until }) => {
      const t0 = performance.now();
      const events = [];
      const pc = new RTCPeerConnection();
      const audio = pc.addTransceiver('audio', { direction: 'sendrecv' });
      const camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
      pc.addTrack(camera.getVideoTracks()[0], camera);
      if (videoCodec) {
        const want = RTCRtpReceiver.getCapabilities('video').codecs.filter((c) => c.mimeType.toLowerCase() === `video/${videoCodec}`);
        if (!want.length) return { status: 0, body: `this browser cannot send ${videoCodec}` };
        pc.getTransceivers().find((t) => t.sender.track?.kind === 'video').setCodecPreferences(want);
      }
      const remoteTrack = new Promise((resolve) => {
        pc.ontrack = (e) => {
          // Played, as a page would: Chromium decodes a received track only for playout.
          const player = new Audio();
          player.srcObject = e.streams[0] || new MediaStream([e.track]);
          player.play().catch(() => {});
          resolve(e.track.kind);
        };
      });
      const dc = pc.createDataChannel('oai-events');
      let done;
      const finished = new Promise((resolve) => { done = resolve; });
      dc.addEventListener('message', (e) => {
        const ev = JSON.parse(e.data);
        events.push({ at: performance.now() - t0, ...ev });
        if (ev.type === until) done(until);
        if (clearOnStart && ev.type === 'output_audio_buffer.started') dc.send(JSON.stringify({ type: 'output_audio_buffer.clear', event_id: 'clear_1' }));
      });
      const opened = new Promise((resolve) => dc.addEventListener('open', resolve));
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      const r = await fetch(`${base}/v1/realtime/calls`, {
        method: 'POST', body: offer.sdp,
        headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/sdp' },
      });
      const status = r.status;
      const location = r.headers.get('Location');
      const sdp = await r.text();
      if (status !== 201) return { status, body: sdp };
      await pc.setRemoteDescription({ type: 'answer', sdp });
      await opened;
      // The microphone starts now: the fake device reads the WAV from its start.
      const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
      await audio.sender.replaceTrack(mic.getAudioTracks()[0]);
      const micAt = performance.now() - t0;
      const update = { type: 'realtime', instructions: 'Be brief.' };
      if (audioOut) update.output_modalities = ['audio'];
      dc.send(JSON.stringify({ type: 'session.update', session: update }));
      // A client image larger than SCTP's default 64 KiB message (noise does not compress).
      const canvas = document.createElement('canvas');
      canvas.width = 160; canvas.height = 160;
      const g = canvas.getContext('2d');
      const px = g.createImageData(160, 160);
      for (let i = 0; i < px.data.length; i++) px.data[i] = (i % 4 === 3) ? 255 : Math.floor(Math.random() * 256);
      g.putImageData(px, 0, 0);
      const imageUrl = canvas.toDataURL('image/png');
      dc.send(JSON.stringify({ type: 'conversation.item.create', event_id: 'client_image', item: { type: 'message', role: 'user', content: [{ type: 'input_image', image_url: imageUrl }] } }));
      const imageBytes = imageUrl.length;
      const how = await Promise.race([finished, new Promise((r) => setTimeout(() => r('timeout'), waitMs))]);
      // The camera's sampling is measured over a fixed window of the call.
      const rest = holdMs - (performance.now() - t0);
      if (rest > 0) await new Promise((r) => setTimeout(r, rest));
      const state = pc.connectionState;
      const remote = await Promise.race([remoteTrack, Promise.resolve('none')]);
      // hark's audio track: RTP packets that arrived and decoded.
      let inboundAudio = null;
      const stats = await pc.getStats();
      let sentVideo = null;
      stats.forEach((r) => {
        if (r.type === 'inbound-rtp' && r.kind === 'audio') inboundAudio = { packets: r.packetsReceived, samples: r.totalSamplesReceived, lost: r.packetsLost, energy: r.totalAudioEnergy };
        // The camera's codec as the browser sent it, and its keyframes (PLI answered).
        if (r.type === 'outbound-rtp' && r.kind === 'video') sentVideo = { codec: stats.get(r.codecId)?.mimeType, frames: r.framesEncoded, keyFrames: r.keyFramesEncoded, pli: r.pliCount };
      });
      pc.close();
      mic.getTracks().forEach((t) => t.stop());
      camera.getTracks().forEach((t) => t.stop());
      return { status, location, how, state, remote, micAt, imageBytes, inboundAudio, sentVideo, events };
    }, { base, key, waitMs, holdMs, audioOut, videoCodec, clearOnStart, until }));
    // A reused key is refused.
    const again = await fetch(`${base}/v1/realtime/calls`, {
      method: 'POST', body: 'v=0', headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/sdp' },
    });
    result.reuse = { status: again.status, body: await again.json() };
  } else if (mode === 'cycles') {
    await page.goto(`${base}/healthz`);
    await page.evaluate(OPEN_CALL);
    const n = Number(process.env.CYCLES || 20);
    result.cycles = [];
    for (let i = 0; i < n; i++) {
      const key = await mintSecret();
      result.cycles.push(await page.evaluate(async ({ base, key }) => {
        const c = await window.openCall(base, key);
        if (c.status !== 201) return { status: c.status };
        c.pc.close();
        c.mic.getTracks().forEach((t) => t.stop());
        return { status: 201, created: c.created };
      }, { base, key }));
    }
  } else if (mode === 'vanish') {
    await page.goto(`${base}/healthz`);
    await page.evaluate(OPEN_CALL);
    const key = await mintSecret();
    Object.assign(result, await page.evaluate(async ({ base, key }) => {
      const c = await window.openCall(base, key);
      window.vanishingCall = c; // kept open (and referenced) until the browser is killed
      return { status: c.status, created: c.created };
    }, { base, key }));
    server.process().kill('SIGKILL');
    result.killed = true;
  } else if (mode === 'page') {
    await page.goto(`${base}/`);
    await page.click('#start');
    const t = Date.now();
    // The page shows the model's text as it streams, and the turn's latency.
    await page.waitForFunction(() => document.querySelector('#log')?.textContent.includes('response.done')
      && document.querySelector('#latency')?.textContent.trim().length > 0, null, { timeout: waitMs });
    result.answer = await page.textContent('#answer');
    result.latency = await page.textContent('#latency');
    result.log = await page.textContent('#log');
    result.frames = await page.evaluate(() => document.querySelector('#camera')?.videoWidth || 0);
    result.waited_ms = Date.now() - t;
    fs.mkdirSync(outDir, { recursive: true });
    const shot = path.join(outDir, 'webrtc_page.png');
    await page.screenshot({ path: shot, fullPage: true });
    result.screenshot = shot;
    await page.click('#stop');
  }
  result.console = console_.slice(-20);
} catch (e) {
  result.error = String(e && e.stack || e);
} finally {
  if (!result.killed) await browser.close().catch(() => {});
  await server.close().catch(() => {});
}
console.log('RESULT ' + JSON.stringify(result));
