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
/// that beta clients do not know (`conversation.item.done`).
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
    if dialect == Dialect::Beta {
        let ga = out.get("type").and_then(Value::as_str).unwrap_or("").to_string();
        if ga == "conversation.item.done" {
            return None;
        }
        out.insert("type".into(), Value::String(beta_event_name(&ga).to_string()));
        beta_content_types(&mut out);
    }
    Some(Value::Object(out).to_string())
}

/// GA content types → beta content types, anywhere in the event.
fn beta_content_types(obj: &mut Map<String, Value>) {
    for (key, v) in obj.iter_mut() {
        match v {
            Value::Object(m) => beta_content_types(m),
            Value::Array(items) => {
                for it in items {
                    if let Value::Object(m) = it {
                        beta_content_types(m);
                    }
                }
            }
            Value::String(s) if key == "type" => {
                if s == "output_text" {
                    *s = "text".into();
                } else if s == "output_audio" {
                    *s = "audio".into();
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
}
