//! `flow embed`'s files: texts read from .txt (a line each) or .jsonl (a string or an object's
//! `text` per line), vectors written as NumPy .npy (float32, rows) or .jsonl, atomically.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The texts of `path`, in order; a line that holds no text is an error naming it.
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).map_err(Error::io(path))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "ndjson");
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(Error::io(path))?;
        let at = format!("{}:{}", path.display(), i + 1);
        if !jsonl {
            if line.trim().is_empty() {
                return Err(Error::bad_input(
                    format!("{at}: an empty line"),
                    "each line of a .txt input is one text: remove empty lines",
                ));
            }
            out.push(line);
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            Error::bad_input(format!("{at}: not JSON: {e}"), "each line must be a JSON string or object")
        })?;
        let text = match &v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get(field).and_then(|t| t.as_str()).map(str::to_string),
            _ => None,
        };
        match text.filter(|t| !t.is_empty()) {
            Some(t) => out.push(t),
            None => {
                return Err(Error::bad_input(
                    format!("{at}: no text (a JSON string, or an object with a non-empty `{field}` string)"),
                    "fix the line, or name the field holding the text with --field",
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::bad_input(format!("{} holds no texts", path.display()), "give a file with a text per line"));
    }
    Ok(out)
}

/// How the output is written, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Npy,
    Jsonl,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("npy") => Ok(Format::Npy),
            Some("jsonl") => Ok(Format::Jsonl),
            _ => Err(Error::bad_input(
                format!("cannot tell the format of {}", path.display()),
                "name the output FILE.npy (NumPy float32, a row per text) or FILE.jsonl",
            )),
        }
    }
}

/// Writes `rows` (n x dim, row-major) to `path` through a temporary file beside it, so a killed run
/// leaves the old file or the whole new one.
pub fn write(path: &Path, format: Format, rows: &[f32], n: usize, dim: usize) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.partial", path.display()));
    let file = std::fs::File::create(&tmp).map_err(Error::io(&tmp))?;
    let mut w = std::io::BufWriter::new(file);
    let result = match format {
        Format::Npy => write_npy(&mut w, rows, n, dim),
        Format::Jsonl => rows
            .chunks(dim.max(1))
            .enumerate()
            .try_for_each(|(i, r)| writeln!(w, "{}", serde_json::json!({ "index": i, "embedding": r }))),
    }
    .and_then(|_| w.flush());
    result.map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}

/// NumPy's format 1.0: magic, a little-endian header length, a Python dict literal padded to a
/// multiple of 64 bytes, then the data (by hand: the header is one line; a crate would bring ndarray).
fn write_npy(w: &mut impl Write, rows: &[f32], n: usize, dim: usize) -> std::io::Result<()> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {dim}), }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for x in rows {
        w.write_all(&x.to_le_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_the_data_follows_it() {
        let mut buf = Vec::new();
        write_npy(&mut buf, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3).unwrap();
        assert_eq!(&buf[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&buf[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'), "{header}");
        let data = &buf[10 + hlen..];
        assert_eq!(data.len(), 24);
        assert_eq!(f32::from_le_bytes(data[20..24].try_into().unwrap()), 6.0);
    }
}
