//! The edge: server events to JSON text in the client's dialect, one `event_id` each.

use serde_json::{json, Map, Value};

use super::{new_id, Dialect, ServerEvent};

/// Server event name (GA) → beta name, where they differ.
fn beta_event_name(ga: &str) -> &str {
    match ga {
        "conversation.item.added" => "conversation.item.created",
        "response.output_text.delta" => "response.text.delta",
        "response.output_text.done" => "response.text.done",
        "response.output_audio.delta" => "response.audio.delta",
        "response.output_audio.done" => "response.audio.done",
        "response.output_audio_transcript.delta" => "response.audio_transcript.delta",
        "response.output_audio_transcript.done" => "response.audio_transcript.done",
        other => other,
    }
}

/// Serializes a server event for one client: adds the `event_id`, and for beta
/// clients renames events and content types. Returns `None` for GA-only events
/// that beta clients do not know (`conversation.item.done`, the MCP lifecycle).
///
/// Beta has no `mcp_call` item: beta clients see hark-run calls as `function_call`
/// items that carry their `output` (and `server_label`), with no MCP events and no
/// `mcp_list_tools` items.
pub fn to_wire(event: &ServerEvent, dialect: Dialect) -> Option<String> {
    let mut value = serde_json::to_value(event).unwrap_or_else(|e| {
        json!({"type": "error", "error": {"type": "server_error", "code": "serialization", "message": e.to_string()}})
    });
    let obj = value.as_object_mut()?;
    if let ServerEvent::SessionCreated { session } | ServerEvent::SessionUpdated { session } = event {
        obj.insert("session".into(), session.to_json(dialect));
    }
    let mut out = Map::with_capacity(obj.len() + 1);
    out.insert("event_id".into(), Value::String(new_id("event")));
    for (k, v) in std::mem::take(obj) {
        out.insert(k, v);
    }
    let ga = out.get("type").and_then(Value::as_str).unwrap_or("").to_string();
    match dialect {
        Dialect::Ga => for_each_object(&mut out, &mut |o| {
            // Clients' schemas require both keys on an mcp_call, null until it finishes.
            if o.get("type").and_then(Value::as_str) == Some("mcp_call") {
                o.entry("output").or_insert(Value::Null);
                o.entry("error").or_insert(Value::Null);
            }
        }),
        Dialect::Beta => {
            let lists_tools = out.get("item").and_then(|i| i.get("type")).and_then(Value::as_str) == Some("mcp_list_tools");
            if ga == "conversation.item.done" || ga.starts_with("response.mcp_call") || ga.starts_with("mcp_list_tools.") || lists_tools {
                return None;
            }
            out.insert("type".into(), Value::String(beta_event_name(&ga).to_string()));
            for_each_object(&mut out, &mut |o| {
                if let Some(Value::String(t)) = o.get_mut("type") {
                    match t.as_str() {
                        "output_text" => *t = "text".into(),
                        "output_audio" => *t = "audio".into(),
                        "mcp_call" => *t = "function_call".into(),
                        _ => {}
                    }
                }
            });
        }
    }
    Some(Value::Object(out).to_string())
}

/// Applies `f` to `obj` and every object nested in it (the event's own `type` is
/// handled by the caller before this runs).
fn for_each_object(obj: &mut Map<String, Value>, f: &mut impl FnMut(&mut Map<String, Value>)) {
    for v in obj.values_mut() {
        match v {
            Value::Object(m) => {
                f(m);
                for_each_object(m, f);
            }
            Value::Array(items) => {
                for it in items.iter_mut() {
                    if let Value::Object(m) = it {
                        f(m);
                        for_each_object(m, f);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    #[test]
    fn parses_ga_session_update_with_null_turn_detection() {
        let env = parse_client_event(
            r#"{"type":"session.update","event_id":"e1","session":{"type":"realtime","audio":{"input":{"turn_detection":null}}}}"#,
        )
        .unwrap();
        assert_eq!(env.event_id.as_deref(), Some("e1"));
        let ClientEvent::SessionUpdate { session } = env.event else { panic!() };
        assert!(matches!(session.audio.unwrap().input.unwrap().turn_detection, Some(None)));
    }

    #[test]
    fn wrong_field_type_names_the_field_and_event() {
        let err = parse_client_event(
            r#"{"type":"session.update","event_id":"e7","session":{"audio":{"input":{"turn_detection":{"type":"server_vad","threshold":"high"}}}}}"#,
        )
        .unwrap_err();
        assert_eq!(err.event_id.as_deref(), Some("e7"));
        assert_eq!(err.param.as_deref(), Some("session.audio.input.turn_detection.threshold"));
    }

    #[test]
    fn unknown_type_and_bad_json_are_errors() {
        assert_eq!(parse_client_event("{nope").unwrap_err().code, "invalid_json");
        let e = parse_client_event(r#"{"type":"foo.bar","event_id":"x"}"#).unwrap_err();
        assert_eq!((e.code, e.param.as_deref(), e.event_id.as_deref()), ("invalid_value", Some("type"), Some("x")));
    }

    #[test]
    fn beta_dialect_renames_text_events_and_content() {
        let ev = ServerEvent::ResponseOutputTextDelta {
            response_id: "r".into(),
            item_id: "i".into(),
            output_index: 0,
            content_index: 0,
            delta: "hi".into(),
        };
        let v: Value = serde_json::from_str(&to_wire(&ev, Dialect::Beta).unwrap()).unwrap();
        assert_eq!(v["type"], "response.text.delta");
        assert!(v["event_id"].as_str().unwrap().starts_with("event_"));
        let part = ServerEvent::ResponseContentPartAdded {
            response_id: "r".into(),
            item_id: "i".into(),
            output_index: 0,
            content_index: 0,
            part: json!({"type": "text", "text": ""}),
        };
        let v: Value = serde_json::from_str(&to_wire(&part, Dialect::Ga).unwrap()).unwrap();
        assert_eq!(v["part"]["type"], "text");
        let item = Item::message("i", ItemStatus::Completed, Role::Assistant, vec![ContentPart::output_text("x")]);
        let added = ServerEvent::ConversationItemAdded { previous_item_id: None, item: item.clone() };
        let v: Value = serde_json::from_str(&to_wire(&added, Dialect::Beta).unwrap()).unwrap();
        assert_eq!(v["type"], "conversation.item.created");
        assert_eq!(v["item"]["content"][0]["type"], "text");
        assert!(to_wire(&ServerEvent::ConversationItemDone { previous_item_id: None, item }, Dialect::Beta).is_none());
    }

    #[test]
    fn mcp_calls_carry_null_output_for_ga_and_are_function_calls_for_beta() {
        let item = Item::mcp_call("i", "hark".into(), "c1".into(), "calculator".into(), "{}".into());
        let added = ServerEvent::ResponseOutputItemAdded { response_id: "r".into(), output_index: 0, item };
        let ga: Value = serde_json::from_str(&to_wire(&added, Dialect::Ga).unwrap()).unwrap();
        assert_eq!((&ga["item"]["type"], &ga["item"]["output"], &ga["item"]["error"]), (&json!("mcp_call"), &Value::Null, &Value::Null));
        assert!(ga["item"].as_object().unwrap().contains_key("output"));
        let beta: Value = serde_json::from_str(&to_wire(&added, Dialect::Beta).unwrap()).unwrap();
        assert_eq!((&beta["item"]["type"], &beta["item"]["call_id"]), (&json!("function_call"), &json!("c1")));
        let progress = ServerEvent::ResponseMcpCallInProgress { item_id: "i".into(), output_index: 0 };
        assert!(to_wire(&progress, Dialect::Beta).is_none());
        assert!(to_wire(&progress, Dialect::Ga).is_some());
        let list = Item::mcp_list_tools("l", "hark".into(), vec![json!({"name": "calculator"})]);
        assert!(to_wire(&ServerEvent::ConversationItemAdded { previous_item_id: None, item: list }, Dialect::Beta).is_none());
    }
}
