//! MovieLens in RecBole's atomic-file layout (`<dir>/<name>.inter`, `<dir>/<name>.item`).
//!
//! Atomic files are tab-separated text whose first line names the columns as `name:type`
//! (`user_id:token`, `rating:float`, ...). Columns are found by NAME, never by position; every
//! data line must have exactly as many fields as the header, and every error names the file and
//! the (1-based) line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One row of the `.inter` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Interaction {
    pub user: u64,
    /// The item token as written in the file (it keys [`Dataset::titles`]).
    pub item: String,
    pub rating: f64,
    pub timestamp: f64,
}

/// The interactions (in file order) and the item titles of one dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub inter_path: PathBuf,
    pub item_path: PathBuf,
    pub interactions: Vec<Interaction>,
    /// item token → title as the original MovieLens `u.item` writes it ("Toy Story (1995)").
    pub titles: HashMap<String, String>,
}

impl Dataset {
    /// Load `<dir>/<name>.inter` and `<dir>/<name>.item`, where `<name>` is the directory's own
    /// name (RecBole's convention, e.g. `assets/ml-100k/ml-100k.inter`); if those do not exist,
    /// the directory's only `.inter` / `.item` file.
    pub fn load(dir: &Path) -> Result<Dataset> {
        let inter_path = find_atomic(dir, "inter")?;
        let item_path = find_atomic(dir, "item")?;
        let interactions = read_interactions(&inter_path)?;
        let titles = read_titles(&item_path)?;
        Ok(Dataset {
            inter_path,
            item_path,
            interactions,
            titles,
        })
    }

    /// The title of an item, or an error naming the `.item` file if the item is not there.
    pub fn title(&self, item: &str) -> Result<&str> {
        self.titles.get(item).map(String::as_str).ok_or_else(|| {
            Error::format(
                &self.item_path,
                format!(
                    "item {item:?} (used in {}) has no row in this file",
                    self.inter_path.display()
                ),
            )
        })
    }
}

/// `<dir>/<dirname>.<ext>`, else the only `*.<ext>` file in `dir`.
fn find_atomic(dir: &Path, ext: &str) -> Result<PathBuf> {
    if let Some(name) = dir.file_name() {
        let p = dir.join(format!("{}.{ext}", name.to_string_lossy()));
        if p.is_file() {
            return Ok(p);
        }
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.is_file() && p.extension().is_some_and(|x| x == ext) {
            found.push(p);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Invalid(format!(
            "{}: no .{ext} file (RecBole atomic file) in this directory",
            dir.display()
        ))),
        _ => Err(Error::Invalid(format!(
            "{}: several .{ext} files and none named after the directory",
            dir.display()
        ))),
    }
}

/// A parsed atomic file: the column names (the part before `:`) and the data lines.
struct Atomic {
    path: PathBuf,
    columns: Vec<String>,
    /// (1-based line number, fields)
    rows: Vec<(usize, Vec<String>)>,
}

impl Atomic {
    fn read(path: &Path) -> Result<Atomic> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| Error::format(path, format!("not UTF-8 text: {e}")))?;
        Atomic::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Atomic> {
        let mut lines = text
            .split('\n')
            .enumerate()
            .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)));
        let header = match lines.next() {
            Some((_, h)) if !h.trim().is_empty() => h,
            _ => return Err(Error::format(path, "empty file: no header line")),
        };
        let columns: Vec<String> = header
            .split('\t')
            .map(|c| c.split(':').next().unwrap_or("").trim().to_string())
            .collect();
        let mut rows = Vec::new();
        for (no, line) in lines {
            // Blank lines (the one after the final newline, in particular) carry no row.
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<String> = line.split('\t').map(str::to_string).collect();
            if fields.len() != columns.len() {
                return Err(Error::format(
                    path,
                    format!(
                        "line {no}: {} fields, the header has {} (truncated or malformed line?)",
                        fields.len(),
                        columns.len()
                    ),
                ));
            }
            rows.push((no, fields));
        }
        Ok(Atomic {
            path: path.to_path_buf(),
            columns,
            rows,
        })
    }

    fn column(&self, name: &str) -> Result<usize> {
        self.columns.iter().position(|c| c == name).ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "line 1: no column {name:?} in the header (columns: {})",
                    self.columns.join(", ")
                ),
            )
        })
    }

    fn number(&self, line: usize, name: &str, field: &str) -> Result<f64> {
        let v: f64 = field.trim().parse().map_err(|_| {
            Error::format(
                &self.path,
                format!("line {line}: column {name}: {field:?} is not a number"),
            )
        })?;
        if !v.is_finite() {
            return Err(Error::format(
                &self.path,
                format!("line {line}: column {name}: {field:?} is not a finite number"),
            ));
        }
        Ok(v)
    }
}

/// Read a `.inter` file (columns `user_id`, `item_id`, `rating`, `timestamp`, in any order;
/// others ignored). Rows come back in file order. User ids must be non-negative integers.
pub fn read_interactions(path: &Path) -> Result<Vec<Interaction>> {
    let a = Atomic::read(path)?;
    let (cu, ci, cr, ct) = (
        a.column("user_id")?,
        a.column("item_id")?,
        a.column("rating")?,
        a.column("timestamp")?,
    );
    let mut out = Vec::with_capacity(a.rows.len());
    for (no, f) in &a.rows {
        let user: u64 = f[cu].trim().parse().map_err(|_| {
            Error::format(
                path,
                format!(
                    "line {no}: column user_id: {:?} is not a non-negative integer",
                    f[cu]
                ),
            )
        })?;
        let item = f[ci].trim().to_string();
        if item.is_empty() {
            return Err(Error::format(
                path,
                format!("line {no}: column item_id is empty"),
            ));
        }
        out.push(Interaction {
            user,
            item,
            rating: a.number(*no, "rating", &f[cr])?,
            timestamp: a.number(*no, "timestamp", &f[ct])?,
        });
    }
    if out.is_empty() {
        return Err(Error::format(path, "no interactions (header only)"));
    }
    Ok(out)
}

/// Read a `.item` file (columns `item_id`, `movie_title`, `release_year`) into
/// item token → original title (see [`original_title`]). A repeated item id is an error.
pub fn read_titles(path: &Path) -> Result<HashMap<String, String>> {
    let a = Atomic::read(path)?;
    let (ci, ct, cy) = (
        a.column("item_id")?,
        a.column("movie_title")?,
        a.column("release_year")?,
    );
    let mut out = HashMap::with_capacity(a.rows.len());
    for (no, f) in &a.rows {
        let item = f[ci].trim().to_string();
        if item.is_empty() {
            return Err(Error::format(
                path,
                format!("line {no}: column item_id is empty"),
            ));
        }
        let title = original_title(&f[ct], &f[cy]);
        if out.insert(item.clone(), title).is_some() {
            return Err(Error::format(
                path,
                format!("line {no}: item {item:?} appears twice"),
            ));
        }
    }
    Ok(out)
}

/// Rebuild the title the original MovieLens `u.item` has from RecBole's split `movie_title` /
/// `release_year`:
/// - a missing title, or RecBole's placeholder `unkonwn` (sic) / `unknown`, with no numeric
///   year → `unknown` (ml-100k item 267, whose u.item title is `unknown`);
/// - otherwise `"{title} ({year})"` when there is a year — RecBole took the last parenthesised
///   group of the u.item title as the "year", so this also restores the one non-numeric case,
///   item 1412 `Land Before Time III: The Time of the Great Giving (1995) (V)`;
/// - a title with no year stays as it is.
///
/// Titles keep their commas and quotes ("Usual Suspects, The (1995)").
pub fn original_title(title: &str, year: &str) -> String {
    let (title, year) = (title.trim(), year.trim());
    let numeric_year = !year.is_empty() && year.bytes().all(|b| b.is_ascii_digit());
    let placeholder = |s: &str| s.is_empty() || s == "unkonwn" || s == "unknown";
    if placeholder(title) && !numeric_year {
        return "unknown".to_string();
    }
    if year.is_empty() || placeholder(year) {
        return title.to_string();
    }
    format!("{title} ({year})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_rebuilt_like_u_item() {
        assert_eq!(original_title("Toy Story", "1995"), "Toy Story (1995)");
        assert_eq!(
            original_title("Usual Suspects, The", "1995"),
            "Usual Suspects, The (1995)"
        );
        assert_eq!(original_title("unkonwn", "unkonwn"), "unknown");
        assert_eq!(original_title("", ""), "unknown");
        assert_eq!(original_title("Some Film", ""), "Some Film");
        assert_eq!(original_title("Some Film", "unkonwn"), "Some Film");
        assert_eq!(
            original_title(
                "Land Before Time III: The Time of the Great Giving (1995)",
                "V"
            ),
            "Land Before Time III: The Time of the Great Giving (1995) (V)"
        );
    }

    #[test]
    fn columns_by_name_and_line_numbers_in_errors() {
        let p = Path::new("x.inter");
        let a = Atomic::parse(
            p,
            "timestamp:float\trating:float\titem_id:token\tuser_id:token\n5\t4\t7\t1\n",
        )
        .unwrap();
        assert_eq!(a.column("user_id").unwrap(), 3);
        assert_eq!(a.rows.len(), 1);
        let e = Atomic::parse(p, "a:token\tb:token\n1\t2\n3\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("x.inter") && e.contains("line 3"), "{e}");
        let e = Atomic::parse(p, "").err().unwrap().to_string();
        assert!(e.contains("x.inter") && e.contains("header"), "{e}");
        let e = a.column("nope").err().unwrap().to_string();
        assert!(e.contains("nope") && e.contains("x.inter"), "{e}");
    }
}
