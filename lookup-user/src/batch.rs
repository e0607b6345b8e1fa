//! Batches of binding changes: the text format `lookupctl apply` reads and
//! sends, and its compact parsed form.

use std::collections::HashMap;

use crate::binding::{Label, ParseError, Selector, parse_port};

/// One parsed change: `Some(label index)` binds, `None` unbinds the
/// selector from `expect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// What it applies to.
    pub selector: Selector,
    /// Index into [`Batch::labels`]: the label bound, or for an unbind the
    /// label the binding must have.
    pub label: u32,
    /// Bind or unbind.
    pub bind: bool,
    /// Line number in the input, for messages.
    pub line: u32,
}

/// A parsed batch; labels are interned (a batch has few distinct labels).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Distinct labels.
    pub labels: Vec<Label>,
    /// Changes, in input order until [`Batch::sort`].
    pub changes: Vec<Change>,
    sorted: bool,
}

impl Batch {
    /// Puts the changes in precedence order, each selector's in input
    /// order, as planning needs them. Costly for large batches, and needs no
    /// lock: the agent sorts before it takes one. Sorting twice is cheap.
    pub fn sort(&mut self) {
        if !self.sorted {
            self.changes
                .sort_by(|a, b| a.selector.precedence(&b.selector).then(a.line.cmp(&b.line)));
            self.sorted = true;
        }
    }
}

/// A line that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

const USAGE: &str = "expected `bind|unbind <label> <tcp|udp> <prefix> <port>`";

/// One line's words: bind or not, then label, protocol, prefix, port.
fn split_line(line: &str) -> Result<(bool, [&str; 4]), String> {
    let mut words = line.split_ascii_whitespace();
    let bind = match words.next() {
        Some("bind") => true,
        Some("unbind") => false,
        Some(other) => return Err(format!("unknown command {other:?}: {USAGE}")),
        None => return Err(USAGE.into()),
    };
    let mut rest = [""; 4];
    let mut n = 1;
    for w in words {
        if n <= 4 {
            rest[n - 1] = w;
        }
        n += 1;
    }
    if n != 5 {
        return Err(format!("{n} words: {USAGE}"));
    }
    Ok((bind, rest))
}

/// A part of a batch, parsed on its own: labels interned locally.
struct Part {
    labels: Vec<Label>,
    changes: Vec<Change>,
}

/// Parses the lines of `text`, numbering them from `first_line`.
fn parse_part(text: &str, first_line: usize) -> Result<Part, LineError> {
    let mut part = Part {
        labels: Vec::new(),
        changes: Vec::with_capacity(text.len() / 32),
    };
    // Labels by name, borrowed from the text: no allocation per line.
    let mut names: HashMap<&str, u32> = HashMap::new();
    for (n, raw) in text.lines().enumerate() {
        let number = first_line + n;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fail = |message: String| LineError {
            line: number,
            message,
        };
        let (bind, [label, protocol, prefix, port]) = split_line(line).map_err(fail)?;
        let label = match names.get(label) {
            Some(&i) => i,
            None => {
                part.labels
                    .push(label.parse().map_err(|e: ParseError| fail(e.to_string()))?);
                let i = (part.labels.len() - 1) as u32;
                names.insert(label, i);
                i
            }
        };
        let selector = Selector {
            protocol: protocol
                .parse()
                .map_err(|e: ParseError| fail(e.to_string()))?,
            prefix: prefix
                .parse()
                .map_err(|e: ParseError| fail(e.to_string()))?,
            port: parse_port(port).map_err(|e| fail(e.to_string()))?,
        };
        part.changes.push(Change {
            selector,
            label,
            bind,
            line: number as u32,
        });
    }
    Ok(part)
}

/// Parses a whole batch; the first bad line is the error. A large batch is
/// parsed in two halves at once.
pub fn parse(text: &str) -> Result<Batch, LineError> {
    const SPLIT_FROM: usize = 1 << 20;
    let parts = if text.len() < SPLIT_FROM {
        vec![parse_part(text, 1)?]
    } else {
        // Split at a line boundary near the middle.
        let middle = text.len() / 2;
        // Bytes, not chars: the middle may fall inside a multi-byte
        // character, and a newline never does.
        let cut = text.as_bytes()[middle..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |i| middle + i + 1);
        let (head, tail) = text.split_at(cut);
        let tail_first = 1 + head.matches('\n').count();
        let (head, tail) = std::thread::scope(|scope| {
            let tail = scope.spawn(|| parse_part(tail, tail_first));
            (
                parse_part(head, 1),
                tail.join().expect("parser thread panicked"),
            )
        });
        // The earlier bad line is the one reported.
        vec![head?, tail?]
    };
    // The first part's changes and labels become the batch's; the others'
    // are appended with their labels re-interned.
    let mut parts = parts.into_iter();
    let first = parts.next().expect("at least one part");
    let mut batch = Batch {
        labels: first.labels,
        changes: first.changes,
        sorted: false,
    };
    let mut index: HashMap<Label, u32> = (0..)
        .zip(&batch.labels)
        .map(|(i, l)| (l.clone(), i))
        .collect();
    for part in parts {
        let map: Vec<u32> = part
            .labels
            .into_iter()
            .map(|l| {
                *index.entry(l.clone()).or_insert_with(|| {
                    batch.labels.push(l);
                    (batch.labels.len() - 1) as u32
                })
            })
            .collect();
        batch.changes.reserve(part.changes.len());
        batch
            .changes
            .extend(part.changes.into_iter().map(|c| Change {
                label: map[c.label as usize],
                ..c
            }));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_lines() {
        let b = parse("# comment\nbind web tcp 10.0.0.0/8 80\n\nunbind web tcp 10.0.0.0/8 80  # trailing\nbind api udp 2001:db8::1 0\n").unwrap();
        assert_eq!(b.changes.len(), 3);
        assert_eq!(b.labels.len(), 2);
        assert_eq!(b.changes[1].line, 4);
        assert!(!b.changes[1].bind);
        let e = parse("bind web tcp 10.0.0.0/8 80\nbind web tcp 10.0.0.1/8 80\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2: ") && e.contains("10.0.0.0/8"), "{e}");
        let e = parse("bnid web tcp 10.0.0.0/8 80").unwrap_err().to_string();
        assert!(e.contains("\"bnid\""), "{e}");
        let e = parse("bind web tcp 10.0.0.0/8").unwrap_err().to_string();
        assert!(e.contains("4 words"), "{e}");
    }

    /// A batch large enough to be parsed in two halves reads as one: line
    /// numbers run on, labels are shared, and the first bad line is named.
    #[test]
    fn large_batches_parse_in_halves_as_one() {
        let mut text = String::new();
        let lines = 60_000u32;
        for i in 0..lines {
            let label = ["web", "api", "dns"][(i % 3) as usize];
            text.push_str(&format!(
                "bind {label} tcp 10.{}.{}.{} 80\n",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            ));
        }
        assert!(text.len() > 1 << 20, "the test must cross the split size");
        let b = parse(&text).unwrap();
        assert_eq!(b.changes.len(), lines as usize);
        assert_eq!(b.labels.len(), 3);
        for (i, c) in b.changes.iter().enumerate() {
            assert_eq!(c.line as usize, i + 1);
            assert_eq!(
                b.labels[c.label as usize].as_str(),
                ["web", "api", "dns"][i % 3]
            );
        }
        // Bad lines in both halves: the earlier one is reported.
        let mut bad: Vec<&str> = text.lines().collect();
        bad[lines as usize - 10] = "bind web tcp 10.0.0.300 80";
        bad[lines as usize / 2 + 5] = "bind web tcp 10.0.0.1/8 80";
        let e = parse(&bad.join("\n")).unwrap_err();
        assert_eq!(e.line, lines as usize / 2 + 6, "{e}");
        bad[lines as usize / 2 + 5] = "bind web tcp 10.0.0.0/8 80";
        let e = parse(&bad.join("\n")).unwrap_err();
        assert_eq!(e.line, lines as usize - 9, "{e}");
        bad[3] = "bnid web tcp 10.0.0.1 80";
        let e = parse(&bad.join("\n")).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
    }

    /// The split falls on a line boundary even where the middle byte is
    /// inside a multi-byte character.
    #[test]
    fn the_split_respects_characters() {
        let line = "bind café tcp 10.0.0.1 80 # é è ê ë\n";
        let body = line.repeat((1 << 20) / line.len() + 2);
        // Pad the front until the middle byte is inside a character.
        let text = (0..line.len())
            .map(|pad| format!("{}\n{body}", "#".repeat(pad)))
            .find(|t| !t.is_char_boundary(t.len() / 2))
            .expect("some padding puts the middle inside a character");
        let b = parse(&text).expect("parses");
        assert_eq!(b.labels.len(), 1);
        assert_eq!(b.labels[0].as_str(), "café");
        assert_eq!(b.changes.len(), text.lines().count() - 1);
    }
}
