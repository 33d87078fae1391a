//! Tool, MCP server and agent YAML files: any text must load or be refused with
//! `file:line: field: problem` errors, never panic.
#![no_main]

use std::path::Path;

use hark::tools::agent::parse_agent_text;
use hark::tools::spec::check_tool_text;
use hark::tools::ToolCatalog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let base = Path::new("/nonexistent/hark-fuzz");
    if which % 2 == 0 {
        let _ = check_tool_text(&base.join("tools/t.yaml"), text, base);
    } else {
        let mut catalog = ToolCatalog::default();
        for name in ["get_time", "calculator", "notes", "weather"] {
            catalog.insert(name, true);
        }
        catalog.open_prefix("time_", true);
        let _ = parse_agent_text(&base.join("agents/a.yaml"), text, &catalog);
    }
});
