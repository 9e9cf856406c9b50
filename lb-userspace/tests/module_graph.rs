//! The agent is organised by layer: `config` → `validate` → `plan` → `provision` / `datapath`
//! → `agent`, with `ebpf` (the object, its maps, their error) below the kernel-facing ones. No
//! two files of `src/` may refer to each other, directly or through others, by `use` or by an
//! inline `crate::` / `super::` path. This test reads the sources and fails on any cycle,
//! printing it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/` but the binary, as its module path (`plan::nodes`).
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, PathBuf>) {
        for e in fs::read_dir(dir).expect("read src") {
            let p = e.expect("entry").path();
            let stem = p.file_stem().expect("name").to_string_lossy().into_owned();
            if p.is_dir() {
                let mut pre = prefix.to_vec();
                pre.push(stem);
                walk(&p, &pre, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let mut path = prefix.to_vec();
                if stem != "mod" && !(prefix.is_empty() && stem == "lib") {
                    path.push(stem);
                }
                out.insert(path.join("::"), p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &[], &mut out);
    out.remove("main");
    out
}

/// Expands a use tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or(tree).trim().to_owned()];
    };
    let head = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').expect("balanced braces")];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand)
        .map(|p| {
            if p == "self" {
                head.to_owned()
            } else if head.is_empty() {
                p
            } else {
                format!("{head}::{p}")
            }
        })
        .collect()
}

/// The paths a file names from the crate root: `use crate::…` trees, inline `crate::a::b`, and
/// `super::` outside its test module, made absolute from the file's module path.
fn references(module: &str, text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("use crate::") {
        let end = rest[i..].find(';').expect("use ends with ;") + i;
        out.extend(expand(&rest[i + "use crate::".len()..end]));
        rest = &rest[end..];
    }
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect::<String>()
            .trim_end_matches(':')
            .to_owned()
    };
    for (i, _) in code.match_indices("crate::") {
        if !code[..i].ends_with("use ") {
            out.push(ident(&code[i + "crate::".len()..]));
        }
    }
    // `super::` in a test module is the file itself; elsewhere it is the parent module.
    let body = code.split("#[cfg(test)]").next().unwrap_or("");
    let parent: Vec<&str> = module.split("::").collect();
    let parent = parent[..parent.len().saturating_sub(1)].join("::");
    let mut rest = body;
    while let Some(i) = rest.find("super::") {
        let after = &rest[i + "super::".len()..];
        let end = if rest[..i].trim_end().ends_with("use") {
            after.find(';').unwrap_or(after.len())
        } else {
            ident(after).len()
        };
        for p in expand(&after[..end]) {
            out.push(if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            });
        }
        rest = &after[end..];
    }
    out
}

/// The deepest module file a path lands in.
fn resolve(path: &str, modules: &BTreeMap<String, PathBuf>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| modules.contains_key(m))
}

/// Paths through a module imported by name (`use crate::plan::{self}` then `plan::nodes::x`):
/// each use of `name::…` in the code, made absolute.
fn through_aliases(
    text: &str,
    used: &[String],
    modules: &BTreeMap<String, PathBuf>,
) -> Vec<String> {
    let mut out = Vec::new();
    for m in used.iter().filter(|p| modules.contains_key(*p)) {
        let alias = m.rsplit("::").next().expect("a segment");
        let pat = format!("{alias}::");
        for (i, _) in text.match_indices(&pat) {
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let tail: String = text[i + pat.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(format!("{m}::{}", tail.trim_end_matches(':')));
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    modules
        .iter()
        .map(|(m, file)| {
            let text = fs::read_to_string(file).expect("read");
            let mut refs = references(m, &text);
            refs.extend(through_aliases(&text, &refs, &modules));
            let deps = refs
                .iter()
                .filter_map(|p| resolve(p, &modules))
                .filter(|d| d != m && !d.is_empty())
                .collect();
            (m.clone(), deps)
        })
        .collect()
}

/// A cycle in `g`, if any, as the modules along it.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for d in g.get(n).into_iter().flatten() {
            match state.get(d.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == d).expect("on stack");
                    let mut c = stack[at..].to_vec();
                    c.push(d.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(d, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_two_agent_files_refer_to_each_other() {
    let g = graph();
    // The reader itself must see the references it is there to judge.
    assert!(
        g["provision"].contains("plan::nodes"),
        "{:?}",
        g["provision"]
    );
    assert!(g["config::limits"].contains("config::duration"), "{g:?}");
    assert!(g["validate"].contains("config"), "{g:?}");
    if let Some(c) = cycle(&g) {
        panic!("import cycle in lb-userspace/src: {}", c.join(" -> "));
    }
}

#[test]
fn a_cycle_is_found() {
    // The checker on a graph with a cycle three files long, and on the same graph without it.
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("a".into(), ["b".into()].into());
    g.insert("b".into(), ["c".into()].into());
    g.insert("c".into(), ["a".into()].into());
    assert_eq!(cycle(&g).map(|c| c.len()), Some(4));
    g.insert("c".into(), BTreeSet::new());
    assert_eq!(cycle(&g), None);
    // Paths inside braces, `self`, and inline paths are all read.
    let r = references(
        "x",
        "use crate::{config::{self, Config}, plan::nodes::plan};\nfn f() { crate::ebpf::map(); }",
    );
    assert_eq!(
        r,
        ["config", "config::Config", "plan::nodes::plan", "ebpf::map"]
    );
}
