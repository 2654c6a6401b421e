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
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("cannot read dataset {}: {e}", path.display())))?;
    let items: Vec<Item> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| {
            BadInput(format!(
                "dataset {} (JSON array, line {}): {e}",
                path.display(),
                e.line()
            ))
        })?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, line)| {
                serde_json::from_str(line).map_err(|e| {
                    BadInput(format!("dataset {} line {}: {e}", path.display(), n + 1))
                })
            })
            .collect::<Result<_, _>>()?
    };
    if items.is_empty() {
        return Err(BadInput(format!("dataset {} has no items", path.display())).into());
    }
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(items
        .into_iter()
        .map(|mut item| {
            if item.image.is_relative() {
                item.image = base.join(&item.image);
            }
            item
        })
        .collect())
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
}
