//! `nash new-plugin <name>`: scaffolds a plugin crate (a `cdylib` depending on nash-core by path)
//! that registers one example loss, `<name>_charbonnier`, with a unit test, a README and an example
//! pipeline. `examples/plugin-template` is this scaffold's output for the name `template`, kept
//! in the workspace so that the test suite builds and loads it.
//!
//! A plugin must share the trainer's exact nash-core build, so it must be a member of the nash
//! workspace: the crate is created inside it and its directory is printed for the root
//! `Cargo.toml`'s `members` (or added there with `--add-to-workspace`).

use std::path::{Component, Path, PathBuf};

use nash_core::{Error, Result};

/// The template files: path inside the crate and text with `{{...}}` placeholders.
const TEMPLATES: [(&str, &str); 4] = [
    ("Cargo.toml", include_str!("../templates/plugin/Cargo.toml.tmpl")),
    ("README.md", include_str!("../templates/plugin/README.md.tmpl")),
    ("pipeline.toml", include_str!("../templates/plugin/pipeline.toml.tmpl")),
    ("src/lib.rs", include_str!("../templates/plugin/src/lib.rs.tmpl")),
];

/// The names a plugin called `name` gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginNames {
    /// `name` with `-` as `_`: the prefix of its type tags (`<snake>_charbonnier`).
    pub snake: String,
    /// The crate's package name, `nash-plugin-<name with - for _>`.
    pub package: String,
    /// The library's name, `nash_plugin_<snake>` (`lib<lib>.so`).
    pub lib: String,
    /// The crate's directory name, `plugin-<name with - for _>`.
    pub dir: String,
}

impl PluginNames {
    /// Checks `name` (lowercase ASCII letters, digits, `_` and `-`, starting with a letter).
    pub fn new(name: &str) -> Result<Self> {
        let ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !ok {
            return Err(Error::config(
                "name",
                format!(
                    "`{name}` is not a plugin name: use lowercase letters, digits, `_` and `-`, starting with a \
                     letter (for example `my_losses`)"
                ),
            ));
        }
        let snake = name.replace('-', "_");
        let dashed = name.replace('_', "-");
        Ok(PluginNames {
            package: format!("nash-plugin-{dashed}"),
            lib: format!("nash_plugin_{snake}"),
            dir: format!("plugin-{dashed}"),
            snake,
        })
    }
}

/// The scaffold's files for `name`, as (path inside the crate, text). `member` is the crate's
/// directory relative to the workspace root (`examples/plugin-template`); nash-core is found at
/// `core/` of the workspace root.
pub fn render(name: &str, member: &str) -> Result<Vec<(PathBuf, String)>> {
    let names = PluginNames::new(name)?;
    let depth = Path::new(member)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    let core_path = format!("{}core", "../".repeat(depth));
    Ok(TEMPLATES
        .iter()
        .map(|(path, text)| {
            let text = text
                .replace("{{package}}", &names.package)
                .replace("{{lib}}", &names.lib)
                .replace("{{core_path}}", &core_path)
                .replace("{{member}}", member)
                .replace("{{name}}", &names.snake);
            (PathBuf::from(path), text)
        })
        .collect())
}

/// The nash workspace root at or above `dir`: a `Cargo.toml` with `[workspace]` beside
/// `core/Cargo.toml` of the package `nash-core`.
pub fn find_workspace(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|d| {
            let root = std::fs::read_to_string(d.join("Cargo.toml")).unwrap_or_default();
            let core = std::fs::read_to_string(d.join("core/Cargo.toml")).unwrap_or_default();
            root.contains("[workspace]") && core.contains("name = \"nash-core\"")
        })
        .map(Path::to_path_buf)
}

/// What [`new_plugin`] made.
#[derive(Clone, Debug)]
pub struct Scaffolded {
    /// The new crate's directory.
    pub crate_dir: PathBuf,
    /// The files written, in the crate directory.
    pub files: Vec<PathBuf>,
    /// The line for `members` in the workspace's root `Cargo.toml`.
    pub member_line: String,
    /// Whether the member was added to the root `Cargo.toml` (else it must be added by hand).
    pub added_to_workspace: bool,
    /// The workspace's package name of the crate (`cargo test -p <package>`).
    pub package: String,
}

/// Scaffolds the plugin crate `<dir>/plugin-<name>` inside the nash workspace that holds `dir`
/// (created if missing); with `add_to_workspace`, adds it to the root `Cargo.toml`'s `members`.
pub fn new_plugin(name: &str, dir: &Path, add_to_workspace: bool) -> Result<Scaffolded> {
    let names = PluginNames::new(name)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let root = find_workspace(&dir).ok_or_else(|| {
        Error::config(
            "--dir",
            format!(
                "{} is not inside the nash workspace; a plugin must be a member of it to share the trainer's \
                 nash-core build (see examples/plugin-huber-loss/README.md): pass `--dir` inside the nash source \
                 tree, for example `--dir plugins`",
                dir.display()
            ),
        )
    })?;
    let crate_dir = dir.join(&names.dir);
    if crate_dir.exists()
        && std::fs::read_dir(&crate_dir)
            .map_err(|e| Error::io(&crate_dir, e))?
            .next()
            .is_some()
    {
        return Err(Error::config(
            "name",
            format!(
                "{} already exists and is not empty; choose another name or `--dir`",
                crate_dir.display()
            ),
        ));
    }
    let member = crate_dir
        .strip_prefix(&root)
        .map_err(|_| Error::Other(format!("{} is not below {}", crate_dir.display(), root.display())))?
        .to_string_lossy()
        .into_owned();
    let mut files = Vec::new();
    for (path, text) in render(name, &member)? {
        let full = crate_dir.join(&path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&full, text).map_err(|e| Error::io(&full, e))?;
        files.push(path);
    }
    let member_line = format!("    \"{member}\",");
    let added_to_workspace = if add_to_workspace {
        let manifest = root.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).map_err(|e| Error::io(&manifest, e))?;
        let updated = add_member(&text, &member).ok_or_else(|| {
            Error::Other(format!(
                "cannot find `members = [...]` in {}; add this line to it:\n{member_line}",
                manifest.display()
            ))
        })?;
        if updated != text {
            std::fs::write(&manifest, updated).map_err(|e| Error::io(&manifest, e))?;
        }
        true
    } else {
        false
    };
    Ok(Scaffolded {
        crate_dir,
        files,
        member_line,
        added_to_workspace,
        package: names.package,
    })
}

/// `manifest` with `"member",` added at the end of the workspace's `members = [...]` list
/// (unchanged if it is listed already); `None` if there is no such list.
pub fn add_member(manifest: &str, member: &str) -> Option<String> {
    let start = manifest.find("members = [")? + "members = [".len();
    let end = start + manifest[start..].find(']')?;
    if manifest[start..end].contains(&format!("\"{member}\"")) {
        return Some(manifest.to_string());
    }
    let list = manifest[start..end].trim_end();
    let sep = if list.is_empty() || list.ends_with(',') {
        ""
    } else {
        ","
    };
    Some(format!(
        "{}{list}{sep}\n    \"{member}\",\n{}",
        &manifest[..start],
        &manifest[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    #[test]
    fn committed_template_is_the_scaffold_output_for_template() {
        let root = workspace_root();
        for (path, text) in render("template", "examples/plugin-template").unwrap() {
            let committed = std::fs::read_to_string(root.join("examples/plugin-template").join(&path))
                .unwrap_or_else(|e| panic!("examples/plugin-template/{}: {e}", path.display()));
            assert!(
                committed == text,
                "examples/plugin-template/{} differs from `nash new-plugin template --dir examples`; \
                 regenerate it",
                path.display()
            );
        }
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("\"examples/plugin-template\""),
            "not a workspace member"
        );
    }

    #[test]
    fn names_are_checked_and_substituted() {
        assert!(PluginNames::new("Bad").is_err());
        assert!(PluginNames::new("9x").is_err());
        assert!(PluginNames::new("a b").is_err());
        let n = PluginNames::new("my-loss").unwrap();
        assert_eq!(
            (n.snake.as_str(), n.package.as_str(), n.lib.as_str(), n.dir.as_str()),
            (
                "my_loss",
                "nash-plugin-my-loss",
                "nash_plugin_my_loss",
                "plugin-my-loss"
            )
        );
        let files = render("my-loss", "plugins/plugin-my-loss").unwrap();
        let text = |p: &str| &files.iter().find(|(f, _)| f == Path::new(p)).unwrap().1;
        assert!(text("Cargo.toml").contains("nash-core = { path = \"../../core\" }"));
        assert!(text("Cargo.toml").contains("name = \"nash-plugin-my-loss\""));
        assert!(text("Cargo.toml").contains("crate-type = [\"cdylib\"]"));
        assert!(text("src/lib.rs").contains("nash_core::declare_plugin!(register);"));
        assert!(text("src/lib.rs").contains("#[typetag::serde(name = \"my_loss_charbonnier\")]"));
        assert!(text("pipeline.toml").contains("type = \"my_loss_charbonnier\""));
        assert!(files.iter().all(|(_, t)| !t.contains("{{")), "unreplaced placeholder");
    }

    #[test]
    fn scaffolds_into_the_workspace_and_adds_the_member() {
        // A fake nash workspace in a temp folder.
        let root = std::env::temp_dir().join(format!("nash-scaffold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("core")).unwrap();
        std::fs::write(root.join("core/Cargo.toml"), "[package]\nname = \"nash-core\"\n").unwrap();
        std::fs::write(
            root.join("Cargo.toml"),
            "[workspace]\nmembers = [\n    \"core\",\n    \"trainer\"\n]\n",
        )
        .unwrap();
        let made = new_plugin("edge", &root.join("plugins"), true).unwrap();
        assert_eq!(made.crate_dir, root.canonicalize().unwrap().join("plugins/plugin-edge"));
        assert_eq!(made.member_line, "    \"plugins/plugin-edge\",");
        for f in ["Cargo.toml", "README.md", "pipeline.toml", "src/lib.rs"] {
            assert!(made.crate_dir.join(f).is_file(), "{f}");
        }
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert_eq!(
            manifest,
            "[workspace]\nmembers = [\n    \"core\",\n    \"trainer\",\n    \"plugins/plugin-edge\",\n]\n"
        );
        // Again: the folder is not empty, and the manifest is left alone.
        let e = new_plugin("edge", &root.join("plugins"), true).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(add_member(&manifest, "plugins/plugin-edge").unwrap(), manifest);
        // Outside any nash workspace.
        let outside = std::env::temp_dir().join(format!("nash-scaffold-out-{}", std::process::id()));
        let e = new_plugin("edge", &outside, false).unwrap_err().to_string();
        assert!(e.contains("not inside the nash workspace"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
