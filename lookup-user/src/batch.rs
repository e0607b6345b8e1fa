//! Batches of binding changes: the text format `lookupctl apply` reads and
//! sends, and its compact parsed form.

use crate::binding::{Binding, Label, ParseError, Selector};

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

fn parse_line(words: &[&str]) -> Result<(bool, Binding), String> {
    let usage = "expected `bind|unbind <label> <tcp|udp> <prefix> <port>`";
    let bind = match words.first() {
        Some(&"bind") => true,
        Some(&"unbind") => false,
        Some(other) => return Err(format!("unknown command {other:?}: {usage}")),
        None => return Err(usage.into()),
    };
    let [_, label, protocol, prefix, port] = words else {
        return Err(format!("{} words: {usage}", words.len()));
    };
    let b = Binding::parse(label, protocol, prefix, port).map_err(|e: ParseError| e.to_string())?;
    Ok((bind, b))
}

/// Parses a whole batch; the first bad line is the error.
pub fn parse(text: &str) -> Result<Batch, LineError> {
    let mut batch = Batch::default();
    let mut index = std::collections::HashMap::<String, u32>::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let (bind, b) = parse_line(&words).map_err(|message| LineError {
            line: n + 1,
            message,
        })?;
        let next = batch.labels.len() as u32;
        let label = *index.entry(b.label.as_str().to_owned()).or_insert_with(|| {
            batch.labels.push(b.label.clone());
            next
        });
        batch.changes.push(Change {
            selector: b.selector(),
            label,
            bind,
            line: (n + 1) as u32,
        });
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
}
