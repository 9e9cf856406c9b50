//! `cargo xtask docs` (and the first step of `cargo xtask test`): the Markdown's relative links
//! and the book's table of contents, checked offline.
//!
//! Read: README.md, ARCHITECTURE.md, deploy/*.md and docs/**/*.md. A relative link must name a
//! file or directory that exists, and its `#anchor` (or a same-file `#anchor`) a heading of the
//! target, slugged as GitHub does. docs/README.md, the table of contents, must link every page
//! under docs/ but the data under docs/bench/. Links in code blocks and inline code, and
//! http(s)/mailto links, are not checked.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Component, Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// The table of contents, and the folder whose pages it must list.
const TOC: &str = "docs/README.md";
const BOOK: &str = "docs";
/// Bench output kept as data: not pages of the book.
const DATA: &str = "docs/bench";

/// Checks the tree under `root`; the error lists every problem as `file:line: ...`.
pub fn check(root: &Path) -> Result<()> {
    let mut pages = BTreeMap::new();
    let mut add = |rel: PathBuf| -> Result<()> {
        let text = std::fs::read_to_string(root.join(&rel))
            .with_context(|| format!("reading {}", rel.display()))?;
        pages.insert(rel, text);
        Ok(())
    };
    for top in ["README.md", "ARCHITECTURE.md"] {
        add(PathBuf::from(top))?;
    }
    for dir in ["deploy", BOOK] {
        for rel in markdown_under(root, Path::new(dir), dir == BOOK)? {
            add(rel)?;
        }
    }
    let problems = problems(&pages, &|p: &Path| root.join(p).exists());
    if problems.is_empty() {
        println!(
            "docs: {} pages, every link and the table of contents good",
            pages.len()
        );
        return Ok(());
    }
    for p in &problems {
        eprintln!("{p}");
    }
    bail!(
        "docs: {} problem(s) in the Markdown (above)",
        problems.len()
    )
}

/// The .md files in `dir` (relative to `root`), and below it if `deep`, sorted.
fn markdown_under(root: &Path, dir: &Path, deep: bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(root.join(dir)).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries {
        let e = e?;
        let rel = dir.join(e.file_name());
        if e.file_type()?.is_dir() {
            if deep {
                out.extend(markdown_under(root, &rel, deep)?);
            }
        } else if rel.extension().is_some_and(|x| x == "md") {
            out.push(rel);
        }
    }
    out.sort();
    Ok(out)
}

/// Every problem in `pages` (repository-relative path → text); `exists` answers for the files
/// that are not pages.
fn problems(pages: &BTreeMap<PathBuf, String>, exists: &dyn Fn(&Path) -> bool) -> Vec<String> {
    let anchors: BTreeMap<&Path, BTreeSet<String>> = pages
        .iter()
        .map(|(p, text)| (p.as_path(), anchors(text)))
        .collect();
    let mut out = Vec::new();
    for (page, text) in pages {
        let dir = page.parent().unwrap_or(Path::new(""));
        for link in links(text) {
            let (file, anchor) = match link.target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link.target.as_str(), None),
            };
            let at = format!("{}:{}: link `{}`", page.display(), link.line, link.target);
            let target = if file.is_empty() {
                page.clone()
            } else {
                match normalise(&dir.join(file)) {
                    Some(t) => t,
                    None => {
                        out.push(format!("{at}: leaves the repository"));
                        continue;
                    }
                }
            };
            if !pages.contains_key(&target) && !exists(&target) {
                out.push(format!("{at}: no such file {}", target.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            match anchors.get(target.as_path()) {
                Some(known) if !known.contains(anchor) => out.push(format!(
                    "{at}: no heading in {} has the anchor #{anchor}",
                    target.display()
                )),
                Some(_) => {}
                None if target.extension().is_some_and(|x| x == "md") => {
                    out.push(format!("{at}: {} is not a checked page", target.display()))
                }
                None => {}
            }
        }
    }
    out.extend(toc_problems(pages));
    out
}

/// The table of contents lists every page under docs/ (but docs/bench/), and only pages.
fn toc_problems(pages: &BTreeMap<PathBuf, String>) -> Vec<String> {
    let toc = Path::new(TOC);
    let Some(text) = pages.get(toc) else {
        return vec![format!(
            "{TOC}: missing: it is the book's table of contents"
        )];
    };
    let listed: BTreeSet<PathBuf> = links(text)
        .iter()
        .filter_map(|l| {
            let file = l.target.split('#').next().unwrap_or("");
            (!file.is_empty()).then(|| normalise(&Path::new(BOOK).join(file)))?
        })
        .collect();
    pages
        .keys()
        .filter(|p| p.starts_with(BOOK) && !p.starts_with(DATA) && p.as_path() != toc)
        .filter(|p| !listed.contains(*p))
        .map(|p| format!("{TOC}: the table of contents does not list {}", p.display()))
        .collect()
}

/// `a/./b/../c` → `a/c`; `None` if it climbs out of the repository.
fn normalise(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(s) => out.push(s),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

struct Link {
    line: usize,
    target: String,
}

/// Lines outside fenced code blocks, numbered from 1.
fn prose(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fence: Option<&str> = None;
    text.lines().enumerate().filter_map(move |(i, line)| {
        let t = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| t.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => {
                fence = Some(m);
                None
            }
            (Some(f), Some(m)) if f == m => {
                fence = None;
                None
            }
            (Some(_), _) => None,
            (None, None) => Some((i + 1, line)),
        }
    })
}

/// Relative `[text](target)` links outside code; external ones (a scheme) left out.
fn links(text: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for (line, s) in prose(text) {
        let s = without_code(s);
        let mut rest = s.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].trim();
            // `[x](<target> "title")`: the target is the first word.
            let target = target.split_whitespace().next().unwrap_or("");
            let target = target.trim_start_matches('<').trim_end_matches('>');
            let external = target.contains("://") || target.starts_with("mailto:");
            if !target.is_empty() && !external {
                out.push(Link {
                    line,
                    target: target.to_owned(),
                });
            }
            rest = &after[end..];
        }
    }
    out
}

/// The line with its inline code spans blanked out.
fn without_code(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find('`') {
        out.push_str(&rest[..i]);
        let ticks = rest[i..].chars().take_while(|&c| c == '`').count();
        let fence = &rest[i..i + ticks];
        match rest[i + ticks..].find(fence) {
            Some(j) => rest = &rest[i + ticks + j + ticks..],
            // An unmatched backtick is a literal one.
            None => {
                out.push_str(fence);
                rest = &rest[i + ticks..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The anchors GitHub gives a page's headings: duplicates get `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim().trim_end_matches('#').trim());
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// GitHub's heading slug: the text as rendered (link targets dropped), lowercase, punctuation
/// but `-` and `_` dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // `[text](target)` renders as `text`.
    while let Some(i) = rest.find("](") {
        let Some(end) = rest[i..].find(')') else {
            break;
        };
        text.push_str(&rest[..i]);
        rest = &rest[i + end + 1..];
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pages: &[(&str, &str)], others: &[&str]) -> Vec<String> {
        let pages = pages
            .iter()
            .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
            .collect();
        let others: BTreeSet<PathBuf> = others.iter().map(PathBuf::from).collect();
        problems(&pages, &|p: &Path| others.contains(p))
    }

    const TOC_OK: (&str, &str) = ("docs/README.md", "- [Ops](ops.md)\n");

    #[test]
    fn good_links_pass() {
        let readme = "# cidlb\n\n## Quick start\n\nSee [ops](docs/ops.md#day-to-day), \
                      [start](#quick-start), [the config](deploy/cidlb.yaml) and \
                      [the web](https://example.org/x.md).\n";
        let ops = "# Operations\n\n## Day to day\n\n## Day to day\n\n[again](#day-to-day-1), \
                   [home](../README.md#cidlb)\n";
        let found = check(
            &[("README.md", readme), ("docs/ops.md", ops), TOC_OK],
            &["deploy/cidlb.yaml"],
        );
        assert_eq!(found, Vec::<String>::new());
    }

    #[test]
    fn a_missing_file_is_named_with_its_line() {
        let readme = "# cidlb\n\nline two\n[ops](docs/opps.md)\n";
        let found = check(
            &[("README.md", readme), ("docs/ops.md", "# Ops\n"), TOC_OK],
            &[],
        );
        assert_eq!(
            found,
            ["README.md:4: link `docs/opps.md`: no such file docs/opps.md"]
        );
    }

    #[test]
    fn a_broken_anchor_is_named() {
        let readme = "# cidlb\n[ops](docs/ops.md#day-today)\n[here](#cidlb-)\n";
        let found = check(
            &[
                ("README.md", readme),
                ("docs/ops.md", "# Ops\n## Day to day\n"),
                TOC_OK,
            ],
            &[],
        );
        assert_eq!(
            found,
            [
                "README.md:2: link `docs/ops.md#day-today`: no heading in docs/ops.md has the anchor #day-today",
                "README.md:3: link `#cidlb-`: no heading in README.md has the anchor #cidlb-",
            ]
        );
    }

    #[test]
    fn code_is_not_checked() {
        let readme = "# cidlb\n\n```sh\n[x](nowhere.md)\n```\n\nInline `[x](nowhere.md)` too.\n";
        assert_eq!(
            check(
                &[("README.md", readme), ("docs/ops.md", "# Ops\n"), TOC_OK],
                &[]
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_toc_lists_every_page_but_the_data() {
        let found = check(
            &[
                ("docs/ops.md", "# Ops\n"),
                ("docs/new.md", "# New\n"),
                ("docs/bench/results.md", "# Results\n"),
                TOC_OK,
            ],
            &[],
        );
        assert_eq!(
            found,
            ["docs/README.md: the table of contents does not list docs/new.md"]
        );
        let toc = ("docs/README.md", "- [Ops](ops.md)\n- [Gone](gone.md)\n");
        let found = check(&[("docs/ops.md", "# Ops\n"), toc], &[]);
        assert_eq!(
            found,
            ["docs/README.md:2: link `gone.md`: no such file docs/gone.md"]
        );
    }

    #[test]
    fn slugs_follow_github() {
        assert_eq!(
            slug("Tunnel mode (direct server return)"),
            "tunnel-mode-direct-server-return"
        );
        assert_eq!(
            slug("New-flow limits (handshake floods)"),
            "new-flow-limits-handshake-floods"
        );
        assert_eq!(slug("What `cidlb run` does"), "what-cidlb-run-does");
        assert_eq!(slug("Targets (issue #11)"), "targets-issue-11");
        assert_eq!(
            slug("Echoed records, NAT against tunnel mode"),
            "echoed-records-nat-against-tunnel-mode"
        );
        assert_eq!(slug("See [ops](ops.md) now"), "see-ops-now");
        assert_eq!(slug("pin_dir × 2"), "pin_dir--2");
    }
}
