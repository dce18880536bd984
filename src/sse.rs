//! A server-sent-events parser for the streams mcp-pool reads: a model's streamed completion
//! (`llm`) and the events of a call forwarded to another node (`cluster`). A leaf module.

/// One event: its `event:` name (`message` when it has none) and its `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
}

/// Parses a body as it arrives. Lines may be split anywhere across network chunks, including
/// inside a UTF-8 character; lines end with LF or CRLF.
#[derive(Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    name: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// The events that `bytes` completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            self.line(line.trim_end_matches(['\n', '\r']), &mut events);
        }
        events
    }

    /// The body ended: a last event without its blank line still counts.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if !self.buffer.is_empty() {
            let rest = std::mem::take(&mut self.buffer);
            let rest = String::from_utf8_lossy(&rest).into_owned();
            self.line(rest.trim_end_matches('\r'), &mut events);
        }
        self.dispatch(&mut events);
        events
    }

    fn line(&mut self, line: &str, events: &mut Vec<SseEvent>) {
        if line.is_empty() {
            self.dispatch(events);
            return;
        }
        // Comments (": keep-alive") and the fields not read here (id, retry) carry no data.
        if let Some(value) = line.strip_prefix("event:") {
            self.name = Some(value.strip_prefix(' ').unwrap_or(value).to_owned());
            return;
        }
        let Some(value) = line.strip_prefix("data:") else {
            return;
        };
        let value = value.strip_prefix(' ').unwrap_or(value);
        match &mut self.data {
            Some(data) => {
                data.push('\n');
                data.push_str(value);
            }
            None => self.data = Some(value.to_owned()),
        }
    }

    /// Ends the current event; one without data is no event.
    fn dispatch(&mut self, events: &mut Vec<SseEvent>) {
        let name = self.name.take();
        if let Some(data) = self.data.take() {
            events.push(SseEvent {
                name: name.unwrap_or_else(|| "message".to_owned()),
                data,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_split_at(stream: &str, split: usize) -> Vec<(String, String)> {
        let bytes = stream.as_bytes();
        let mut parser = SseParser::default();
        let mut events = parser.push(&bytes[..split]);
        events.extend(parser.push(&bytes[split..]));
        events.extend(parser.finish());
        events.into_iter().map(|e| (e.name, e.data)).collect()
    }

    #[test]
    fn events_split_anywhere_are_reassembled() {
        let stream = "data: {\"a\":\"é\"}\r\n\r\n: keep-alive\n\nevent: progress\ndata: a\ndata: b\n\n\
                      event: empty\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            assert_eq!(
                parse_split_at(stream, split),
                [
                    ("message".to_owned(), "{\"a\":\"é\"}".to_owned()),
                    ("progress".to_owned(), "a\nb".to_owned()),
                    ("message".to_owned(), "[DONE]".to_owned()),
                ],
                "split at {split}"
            );
        }
    }
}
