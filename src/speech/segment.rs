//! Streamed text → pieces worth synthesizing: the first clause as soon as it is
//! complete (so the first audio starts early), then whole sentences (so the voice's
//! prosody spans the sentence), and whatever is left when the text ends.

/// A clause shorter than this many words is not spoken on its own at the start (a lone
/// "Well," costs a synthesis call and sounds clipped).
const FIRST_CLAUSE_MIN_WORDS: usize = 2;
/// A sentence running past this many characters is cut at its last clause boundary,
/// so one endless sentence does not hold back all the audio.
const MAX_SEGMENT_CHARS: usize = 240;

/// Cuts streamed text into segments. Push deltas, take what is ready, finish at the end.
#[derive(Debug, Default)]
pub struct Segmenter {
    pending: String,
    /// Whether a segment was already given out (only the first may be a lone clause).
    started: bool,
}

impl Segmenter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds text; returns the segments it completed, in order.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.pending.push_str(delta);
        let mut out = Vec::new();
        while let Some(end) = self.next_cut() {
            let seg: String = self.pending.drain(..end).collect();
            let seg = seg.trim();
            if !seg.is_empty() {
                out.push(seg.to_string());
                self.started = true;
            }
        }
        out
    }

    /// The text is complete: returns what is left (if it holds anything speakable).
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        let rest = rest.trim();
        (rest.chars().any(char::is_alphanumeric)).then(|| rest.to_string())
    }

    /// Byte index just past the next segment ready in `pending`, if one is.
    fn next_cut(&self) -> Option<usize> {
        let text = self.pending.as_str();
        let mut last_clause = None;
        let mut iter = text.char_indices().peekable();
        while let Some((i, c)) = iter.next() {
            let after = i + c.len_utf8();
            // A boundary is punctuation followed by whitespace: "3.5" and "e.g.x" are
            // not cut, and the text's end is not a boundary yet (more may follow).
            let followed_by_space = matches!(iter.peek(), Some((_, n)) if n.is_whitespace());
            if !followed_by_space {
                continue;
            }
            match c {
                '.' | '!' | '?' | '…' if !is_abbreviation(&text[..i]) => return Some(after),
                ',' | ';' | ':' | '—' => {
                    if !self.started && text[..i].split_whitespace().count() >= FIRST_CLAUSE_MIN_WORDS {
                        return Some(after);
                    }
                    last_clause = Some(after);
                }
                _ => {}
            }
            if text[..after].len() > MAX_SEGMENT_CHARS {
                if let Some(cut) = last_clause {
                    return Some(cut);
                }
            }
        }
        // A very long run without any boundary: cut at a space rather than wait forever.
        if text.len() > MAX_SEGMENT_CHARS {
            let limit = floor_char_boundary(text, MAX_SEGMENT_CHARS);
            return text[..limit].rfind(char::is_whitespace).map(|i| i + 1).or(Some(limit));
        }
        None
    }
}

/// Whether the word before a '.' is a common abbreviation ("Dr.", "e.g.") rather than
/// the end of a sentence.
fn is_abbreviation(before: &str) -> bool {
    let word = before.rsplit(|c: char| c.is_whitespace()).next().unwrap_or("");
    let w = word.trim_start_matches(['(', '"', '\'']).to_ascii_lowercase();
    matches!(w.as_str(), "mr" | "mrs" | "ms" | "dr" | "st" | "prof" | "vs" | "etc" | "e.g" | "i.e" | "approx" | "no" | "jr" | "sr")
        || (w.len() == 1 && w.chars().all(|c| c.is_ascii_alphabetic()) && word.chars().all(char::is_uppercase))
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The clauses of a segment with the punctuation that ends each (`' '` when none):
/// voices are trained on clause phonemes followed by their terminator.
pub fn clauses(segment: &str) -> Vec<(String, char)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = segment.chars().peekable();
    while let Some(c) = chars.next() {
        let at_boundary = chars.peek().is_none_or(|n| n.is_whitespace());
        if matches!(c, '.' | '!' | '?' | ',' | ';' | ':') && at_boundary {
            if cur.trim().chars().any(char::is_alphanumeric) {
                out.push((cur.trim().to_string(), c));
            }
            cur.clear();
        } else {
            cur.push(c);
        }
    }
    if cur.trim().chars().any(char::is_alphanumeric) {
        out.push((cur.trim().to_string(), ' '));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(words: &[&str]) -> Vec<String> {
        let mut s = Segmenter::new();
        let mut out = Vec::new();
        for w in words {
            out.extend(s.push(w));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn first_clause_early_then_sentences() {
        let out = feed(&["Sure thing, ", "the weather ", "in Paris is mild, ", "about 18 degrees. ", "Enjoy ", "your day!"]);
        assert_eq!(out, ["Sure thing,", "the weather in Paris is mild, about 18 degrees.", "Enjoy your day!"]);
    }

    #[test]
    fn nothing_is_cut_before_a_boundary_is_certain() {
        let mut s = Segmenter::new();
        // "3." could be "3.5": wait for the next character.
        assert!(s.push("It costs 3.").is_empty());
        assert!(s.push("5 euros").is_empty());
        assert_eq!(s.push(". Then "), ["It costs 3.5 euros."]);
        assert_eq!(s.finish().as_deref(), Some("Then"));
    }

    #[test]
    fn abbreviations_and_single_words_do_not_cut() {
        assert_eq!(feed(&["Well, Dr. Smith is here. ", "Ok."]), ["Well, Dr. Smith is here.", "Ok."]);
    }

    #[test]
    fn endless_text_is_cut_at_a_space() {
        let long = "word ".repeat(200);
        let out = feed(&[&long]);
        assert!(out.len() >= 3, "{}", out.len());
        assert!(out.iter().all(|s| s.len() <= MAX_SEGMENT_CHARS + 1));
        assert_eq!(out.join(" ").split_whitespace().count(), 200);
    }

    #[test]
    fn finish_drops_punctuation_only_rest() {
        let mut s = Segmenter::new();
        s.push("Done. ");
        assert_eq!(s.finish(), None);
        s.push(" ... ");
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn clauses_keep_their_terminators() {
        assert_eq!(
            clauses("Hello there, how are you? Fine"),
            [("Hello there".to_string(), ','), ("how are you".to_string(), '?'), ("Fine".to_string(), ' ')]
        );
        assert_eq!(clauses("3.5 euros."), [("3.5 euros".to_string(), '.')]);
    }
}
