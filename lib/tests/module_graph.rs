//! The module graph is the one `module-graph.txt` (at the repository root) draws, and
//! ARCHITECTURE.md's picture shows.
//!
//! Every `crate::…` and `super::…` path in `lib/src` and `deviceplugin/src` (in `use`
//! declarations, expressions, types, attributes and macro bodies; not in comments or strings) is
//! an edge from the file's module to the module the path names. An edge between a module and
//! one of its ancestors or descendants is the module tree itself and always allowed; any other
//! edge is between two siblings of one parent, and the table's section for that parent must put
//! the user on a higher line than the module it uses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use proc_macro2::{Delimiter, TokenStream, TokenTree};

/// The table, relative to the repository root.
const TABLE: &str = "module-graph.txt";

/// The source trees checked, relative to the repository root.
const TREES: &[&str] = &["lib/src", "deviceplugin/src"];

fn repo_root() -> PathBuf {
    match std::env::var_os("MODULE_GRAPH_ROOT") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
    }
}

/// A module path from the crate root (`["attach", "plan"]`).
type ModPath = Vec<String>;

/// One import: the file, the module it is in, the path as written, the module it names.
#[derive(Debug, Clone)]
struct Import {
    file: PathBuf,
    from: ModPath,
    written: String,
    to: ModPath,
}

/// An edge between two siblings: the parent's directory (the table section), user, used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    scope: String,
    from: String,
    to: String,
}

impl Import {
    fn edge(&self, tree: &str) -> Option<Edge> {
        let common = self
            .from
            .iter()
            .zip(&self.to)
            .take_while(|(a, b)| a == b)
            .count();
        if common == self.from.len() || common == self.to.len() {
            return None; // an ancestor or descendant: the module tree itself
        }
        let mut scope = tree.to_owned();
        for seg in &self.from[..common] {
            scope.push('/');
            scope.push_str(seg);
        }
        Some(Edge {
            scope,
            from: self.from[common].clone(),
            to: self.to[common].clone(),
        })
    }
}

/// The file of module `path` under `src`, if it is a file module.
fn module_file(src: &Path, path: &[String]) -> Option<PathBuf> {
    if path.is_empty() {
        return Some(src.join("lib.rs"));
    }
    let mut dir = src.to_owned();
    for seg in &path[..path.len() - 1] {
        dir.push(seg);
    }
    let last = &path[path.len() - 1];
    [
        dir.join(format!("{last}.rs")),
        dir.join(last).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The longest prefix of `path` that is a file module.
fn resolve(src: &Path, path: &[String]) -> ModPath {
    let mut n = 0;
    while n < path.len() && module_file(src, &path[..=n]).is_some() {
        n += 1;
    }
    path[..n].to_vec()
}

/// Every `.rs` file under `src` with its module path.
fn files(src: &Path) -> Vec<(PathBuf, ModPath)> {
    fn walk(dir: &Path, prefix: &ModPath, out: &mut Vec<(PathBuf, ModPath)>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            if p.is_dir() {
                let mut sub = prefix.clone();
                sub.push(name);
                walk(&p, &sub, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut m = prefix.clone();
                if !matches!(stem, "mod" | "lib") {
                    m.push(stem.to_owned());
                }
                out.push((p, m));
            }
        }
    }
    let mut out = Vec::new();
    walk(src, &Vec::new(), &mut out);
    out
}

fn is_path_sep(tokens: &[TokenTree], i: usize) -> bool {
    matches!((tokens.get(i), tokens.get(i + 1)),
        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':')
}

fn ident(t: Option<&TokenTree>) -> Option<String> {
    match t {
        Some(TokenTree::Ident(i)) => Some(i.to_string()),
        _ => None,
    }
}

/// The paths of a `use` tree (or a plain path) starting at `tokens[i]`, below `base`.
/// Returns the index after it.
fn path_at(tokens: &[TokenTree], mut i: usize, mut base: ModPath, out: &mut Vec<ModPath>) -> usize {
    loop {
        match tokens.get(i) {
            Some(TokenTree::Ident(id)) => {
                let s = id.to_string();
                match s.as_str() {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => base.push(s),
                }
                i += 1;
            }
            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => {
                let inner: Vec<TokenTree> = g.stream().into_iter().collect();
                let mut j = 0;
                while j < inner.len() {
                    j = path_at(&inner, j, base.clone(), out);
                    // Skip `as name` and anything else up to the next comma.
                    while j < inner.len()
                        && !matches!(&inner[j], TokenTree::Punct(p) if p.as_char() == ',')
                    {
                        j += 1;
                    }
                    j += 1;
                }
                return i + 1;
            }
            _ => break, // `*`, or the end of the path
        }
        if is_path_sep(tokens, i) {
            i += 2;
        } else {
            break;
        }
    }
    out.push(base);
    i
}

/// Every `crate::`/`super::` path in `tokens`, as absolute paths; `module` is where they are.
fn scan(tokens: TokenStream, module: &ModPath, out: &mut Vec<(ModPath, String)>) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            TokenTree::Ident(id) if id == "mod" => {
                if let (Some(name), Some(TokenTree::Group(g))) =
                    (ident(tokens.get(i + 1)), tokens.get(i + 2))
                {
                    let mut inner = module.clone();
                    inner.push(name);
                    scan(g.stream(), &inner, out);
                    i += 3;
                    continue;
                }
            }
            TokenTree::Ident(id)
                if (id == "crate" || id == "super") && is_path_sep(&tokens, i + 1) =>
            {
                let base = if id == "crate" {
                    Vec::new()
                } else {
                    module[..module.len().saturating_sub(1)].to_vec()
                };
                let mut paths = Vec::new();
                let end = path_at(&tokens, i + 3, base, &mut paths);
                let written: String = tokens[i..end]
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("")
                    .split_whitespace()
                    .collect();
                out.extend(paths.into_iter().map(|p| (p, written.clone())));
                i = end;
                continue;
            }
            TokenTree::Group(g) => scan(g.stream(), module, out),
            _ => {}
        }
        i += 1;
    }
}

/// Every import of every file under `tree`.
fn imports(root: &Path, tree: &str) -> Vec<Import> {
    let src = root.join(tree);
    let mut out = Vec::new();
    for (file, module) in files(&src) {
        let text = std::fs::read_to_string(&file).unwrap();
        let tokens = TokenStream::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not tokenize: {e}", file.display()));
        let mut paths = Vec::new();
        scan(tokens, &module, &mut paths);
        for (path, written) in paths {
            out.push(Import {
                file: file.strip_prefix(root).unwrap_or(&file).to_owned(),
                from: module.clone(),
                to: resolve(&src, &path),
                written,
            });
        }
    }
    out
}

/// The table: per section (a module's directory), its children by layer, top first.
#[derive(Debug, Default)]
struct Table {
    sections: BTreeMap<String, Vec<Vec<String>>>,
}

impl Table {
    fn parse(text: &str) -> Table {
        let mut table = Table::default();
        let mut current: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                table.sections.insert(name.to_owned(), Vec::new());
                current = Some(name.to_owned());
                continue;
            }
            let section = current
                .as_ref()
                .unwrap_or_else(|| panic!("{TABLE}:{}: a layer before any [section]", n + 1));
            table
                .sections
                .get_mut(section)
                .unwrap()
                .push(line.split_whitespace().map(str::to_owned).collect());
        }
        table
    }

    fn layer(&self, scope: &str, module: &str) -> Option<usize> {
        self.sections
            .get(scope)?
            .iter()
            .position(|l| l.iter().any(|m| m == module))
    }

    fn allows(&self, e: &Edge) -> bool {
        matches!((self.layer(&e.scope, &e.from), self.layer(&e.scope, &e.to)), (Some(f), Some(t)) if f < t)
    }
}

fn load_table(root: &Path) -> Table {
    let path = root.join(TABLE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    Table::parse(&text)
}

/// Every module directory (a section the table must have) with its children.
fn scopes(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for tree in TREES {
        for (_, module) in files(&root.join(tree)) {
            if let Some((last, parent)) = module.split_last() {
                let mut scope = tree.to_string();
                for seg in parent {
                    scope.push('/');
                    scope.push_str(seg);
                }
                out.entry(scope).or_default().insert(last.clone());
            }
        }
    }
    out
}

fn all_edges(root: &Path) -> Vec<(Edge, Import)> {
    let mut out = Vec::new();
    for tree in TREES {
        for import in imports(root, tree) {
            if let Some(e) = import.edge(tree) {
                out.push((e, import));
            }
        }
    }
    out
}

/// Sets of modules of one section that use each other in a circle.
fn cycles(edges: &BTreeSet<Edge>) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let scopes: BTreeSet<&String> = edges.iter().map(|e| &e.scope).collect();
    for scope in scopes {
        let next: BTreeMap<&str, Vec<&str>> =
            edges
                .iter()
                .filter(|e| &e.scope == scope)
                .fold(BTreeMap::new(), |mut m, e| {
                    m.entry(e.from.as_str()).or_default().push(e.to.as_str());
                    m
                });
        let reach = |start: &str| {
            let mut seen = BTreeSet::new();
            let mut todo = vec![start];
            while let Some(m) = todo.pop() {
                for n in next.get(m).into_iter().flatten() {
                    if seen.insert(*n) {
                        todo.push(n);
                    }
                }
            }
            seen
        };
        let mut done: BTreeSet<&str> = BTreeSet::new();
        for &m in next.keys() {
            if done.contains(m) || !reach(m).contains(m) {
                continue;
            }
            let circle: Vec<&str> = reach(m)
                .into_iter()
                .filter(|n| reach(n).contains(m))
                .collect();
            done.extend(&circle);
            out.push((
                scope.clone(),
                circle.iter().map(|n| n.to_string()).collect(),
            ));
        }
    }
    out
}

#[test]
fn every_import_points_down_the_table() {
    let root = repo_root();
    let table = load_table(&root);
    let mut problems = String::new();
    for (scope, children) in scopes(&root) {
        let Some(layers) = table.sections.get(&scope) else {
            writeln!(
                problems,
                "{TABLE} has no section [{scope}] for {children:?}"
            )
            .unwrap();
            continue;
        };
        let listed: BTreeSet<String> = layers.iter().flatten().cloned().collect();
        for m in children.difference(&listed) {
            writeln!(
                problems,
                "{TABLE} [{scope}] does not list the module `{m}`: put it on its layer"
            )
            .unwrap();
        }
        for m in listed.difference(&children) {
            writeln!(
                problems,
                "{TABLE} [{scope}] lists `{m}`, which is not a module there: remove it"
            )
            .unwrap();
        }
    }
    let edges = all_edges(&root);
    let mut seen = BTreeSet::new();
    for (edge, import) in edges {
        if table.allows(&edge) || !seen.insert((import.file.clone(), edge.clone())) {
            continue;
        }
        writeln!(
            problems,
            "{}: `{}` makes `{}` use `{}`, which {TABLE} [{}] does not put below it: \
             import something lower instead, or change the table (and ARCHITECTURE.md's picture) if the design changed",
            import.file.display(),
            import.written,
            edge.from,
            edge.to,
            edge.scope,
        )
        .unwrap();
    }
    assert!(
        problems.is_empty(),
        "the module graph breaks {TABLE}:\n{problems}"
    );
}

/// The summary the table's counts come from: run with `--ignored --nocapture`, and with
/// `MODULE_GRAPH_ROOT=<a checkout>` for another tree.
#[test]
#[ignore = "prints a summary; asserts nothing"]
fn module_graph_summary() {
    let root = repo_root();
    let table = load_table(&root);
    let edges: BTreeSet<Edge> = all_edges(&root).into_iter().map(|(e, _)| e).collect();
    let upward: Vec<&Edge> = edges.iter().filter(|e| !table.allows(e)).collect();
    let cycles = cycles(&edges);
    println!("edges between siblings: {}", edges.len());
    if std::env::var_os("MODULE_GRAPH_ALL").is_some() {
        for e in &edges {
            println!("  [{}] {} -> {}", e.scope, e.from, e.to);
        }
    }
    println!("not allowed by {TABLE}: {}", upward.len());
    for e in &upward {
        println!("  [{}] {} -> {}", e.scope, e.from, e.to);
    }
    println!("cycles: {}", cycles.len());
    for (scope, c) in &cycles {
        println!("  [{scope}] {}", c.join(" <-> "));
    }
}

/// ARCHITECTURE.md's picture of the library's layers is the table's `[lib/src]` section.
#[test]
fn the_architecture_picture_is_the_table() {
    let root = repo_root();
    let table = load_table(&root);
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let after = doc
        .split("## Layers inside the library")
        .nth(1)
        .expect("ARCHITECTURE.md has `## Layers inside the library`");
    let picture = after
        .split("```")
        .nth(1)
        .expect("a picture in a code block under it");
    let drawn = Table::parse(&format!("[lib/src]\n{picture}"));
    assert_eq!(
        drawn.sections["lib/src"], table.sections["lib/src"],
        "ARCHITECTURE.md's picture differs from {TABLE} [lib/src]: copy the section into it"
    );
}
