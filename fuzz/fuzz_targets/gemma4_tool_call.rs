//! The Gemma 4 tool-call parser on model output: the text fed in the chunks a stream
//! would deliver (split where the fuzzer says), and argument bodies on their own.
#![no_main]

use hark::model::gemma4::tool_call::{parse_arguments, ParsedEvent, ToolCallParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let _ = parse_arguments(text);

    // Chunks of 1..=16 characters (the first byte picks the size), so that markers and
    // strings are cut at every place a token boundary could cut them.
    let step = usize::from(split % 16) + 1;
    let mut parser = ToolCallParser::new();
    let mut events: Vec<ParsedEvent> = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for chunk in chars.chunks(step) {
        let (start, _) = chunk[0];
        let (last, c) = chunk[chunk.len() - 1];
        events.extend(parser.push(&text[start..last + c.len_utf8()]));
    }
    events.extend(parser.finish());
    for e in &events {
        if let ParsedEvent::ToolCall { arguments, .. } = e {
            assert!(arguments.is_object(), "tool call arguments must be an object: {arguments}");
        }
    }
});
