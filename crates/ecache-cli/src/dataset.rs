//! Evaluation datasets in the LLaVA / MM-Vet layout: a JSON array, or JSON lines, of
//! items with `image`, `question` and `answer` (`id` optional). Image paths are relative to
//! the dataset file.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::BadInput;

/// One evaluation item.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Item {
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    pub image: PathBuf,
    pub question: String,
    pub answer: String,
    /// Optional task kind: `short` items count toward exact-match accuracy and
    /// `description` items toward ROUGE-L against the reference.
    #[serde(default)]
    pub kind: Option<String>,
}

/// Reads a dataset; image paths become relative to the dataset's folder. A malformed line
/// or a missing field is an error naming the file and the line or item.
pub fn read(path: &Path) -> Result<Vec<Item>> {
    Ok(read_with(path, false)?.0)
}

/// Reads a dataset; with `keep_going` a malformed line or item is reported (the returned
/// messages) and skipped instead of stopping the run. A file that cannot be read, a JSON
/// array that does not parse, or a dataset left with no items is always an error.
pub fn read_with(path: &Path, keep_going: bool) -> Result<(Vec<Item>, Vec<String>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("cannot read dataset {}: {e}", path.display())))?;
    let mut skipped = Vec::new();
    let mut items = Vec::new();
    let mut take = |parsed: Result<Item, serde_json::Error>, place: String| -> Result<()> {
        match parsed {
            Ok(item) => items.push(item),
            Err(e) if keep_going => skipped.push(format!("{place}: {e}")),
            Err(e) => return Err(BadInput(format!("{place}: {e}")).into()),
        }
        Ok(())
    };
    if text.trim_start().starts_with('[') {
        let values: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
            BadInput(format!(
                "dataset {} (JSON array, line {}): {e}",
                path.display(),
                e.line()
            ))
        })?;
        for (n, value) in values.into_iter().enumerate() {
            let place = format!("dataset {} item {}", path.display(), n + 1);
            take(serde_json::from_value(value), place)?;
        }
    } else {
        for (n, line) in text.lines().enumerate() {
            if !line.trim().is_empty() {
                let place = format!("dataset {} line {}", path.display(), n + 1);
                take(serde_json::from_str(line), place)?;
            }
        }
    }
    if items.is_empty() {
        return Err(BadInput(format!("dataset {} has no items", path.display())).into());
    }
    let base = path.parent().unwrap_or(Path::new("."));
    for item in &mut items {
        if item.image.is_relative() {
            item.image = base.join(&item.image);
        }
    }
    Ok((items, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ecache-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn arrays_and_lines_read_alike() {
        let item = r#"{"image": "a.png", "question": "q", "answer": "a"}"#;
        let a = read(&write("a.json", &format!("[{item}, {item}]"))).unwrap();
        let b = read(&write("b.jsonl", &format!("{item}\n\n{item}\n"))).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert!(a[0].image.ends_with("a.png") && a[0].image.is_absolute());
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let good = r#"{"image": "a.png", "question": "q", "answer": "a"}"#;
        let err = read(&write("c.jsonl", &format!("{good}\n{{\"image\": \"x\"\n")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.jsonl line 2"), "{err}");
        let err = read(&write(
            "d.jsonl",
            &format!("{good}\n{{\"image\": \"x\", \"question\": \"q\"}}\n"),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 2") && err.contains("answer"), "{err}");
        let err = read(&write("e.json", "[]")).unwrap_err().to_string();
        assert!(err.contains("no items"), "{err}");
    }

    #[test]
    fn keep_going_skips_and_reports_bad_lines() {
        let good = r#"{"image": "a.png", "question": "q", "answer": "a"}"#;
        let path = write(
            "f.jsonl",
            &format!("{good}\n{{\"image\": \"x\"\n{good}\n{{}}\n"),
        );
        let (items, skipped) = read_with(&path, true).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("f.jsonl line 2"), "{skipped:?}");
        assert!(
            skipped[1].contains("line 4") && skipped[1].contains("image"),
            "{skipped:?}"
        );
        let path = write("g.json", &format!("[{good}, {{\"image\": 3}}]"));
        let (items, skipped) = read_with(&path, true).unwrap();
        assert_eq!(items.len(), 1);
        assert!(skipped[0].contains("item 2"), "{skipped:?}");
        assert!(read_with(&path, false).is_err());
    }
}
