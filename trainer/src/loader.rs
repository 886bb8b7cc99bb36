//! Finds, checks and loads plugin libraries.
//!
//! A plugin is a `cdylib` that links the trainer's `libnash_core.so` and exports a
//! [`PluginDeclaration`] named `NASH_PLUGIN_DECLARATION` (see [`nash_core::plugin`]). Rust has no
//! stable ABI, so before any of a plugin's code runs (`dlopen` runs its constructors) the loader
//! reads the library's ELF file and refuses it unless
//! - it defines `NASH_PLUGIN_DECLARATION` with the size of this trainer's declaration,
//! - it links the very `libstd-<hash>.so` this process runs on (same rustc),
//! - it links `libnash_core.so` (instead of carrying a static copy of nash-core), and
//! - every nash-core symbol it imports is defined by the `libnash_core.so` loaded in this process
//!   (the hash in Rust's mangled names differs between two builds of nash-core).
//!
//! Only then is it opened with `RTLD_NOW`, its declaration checked
//! ([`PluginDeclaration::check_compatible`]) and its `register` function called, with panics
//! caught. Libraries are never unloaded: typetag and the registry keep pointers into them.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use nash_core::error::{Error, Result};
use nash_core::plugin::{PluginDeclaration, DECLARATION_SYMBOL};
use nash_core::registry::Registry;
use nash_core::tracing::{debug, info};
use object::elf;
use object::read::elf::{Dyn, FileHeader, Sym};
use object::Endianness;

/// The environment variable listing extra plugin directories or files, `:`-separated.
pub const PLUGIN_PATH_VAR: &str = "NASH_PLUGIN_PATH";

/// How to build a plugin that this trainer accepts; appended to refusals.
const REBUILD_HINT: &str = "build the plugin in the same cargo workspace, profile and toolchain as the trainer \
     (add it to the workspace `members` and run `cargo build --workspace`, with `--release` if the trainer is a \
     release build), as examples/plugin-huber-loss/README.md describes";

/// A plugin library that was loaded and registered its types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedPlugin {
    /// The plugin's package name.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// Where the library was loaded from (canonical path).
    pub path: PathBuf,
}

/// The registry of every type available to pipelines, and the plugins that brought them.
#[derive(Debug)]
pub struct PluginSet {
    /// Every registered type.
    pub registry: Registry,
    /// The loaded plugins, in load order.
    pub plugins: Vec<LoadedPlugin>,
    /// `(device, inode)` of every library loaded into this set, so a file reached twice (through
    /// two directories, a symlink or a hard link) is loaded once.
    files: HashSet<(u64, u64)>,
}

impl PluginSet {
    /// Registers nash-core's own types, then loads, in order: every plugin library beside the
    /// current executable, every one on `NASH_PLUGIN_PATH` (`:`-separated directories or files),
    /// then `extra` (paths from the pipeline's `plugins = [...]`, already resolved relative to the
    /// pipeline file). Stops at the first refusal.
    pub fn load_all(extra: &[PathBuf]) -> Result<PluginSet> {
        let mut set = PluginSet::core_only()?;
        match std::env::current_exe() {
            Ok(exe) => {
                if let Some(dir) = exe.parent() {
                    set.load_dir(dir)?;
                }
            }
            Err(e) => debug!("cannot locate the executable ({e}); no plugins beside it are loaded"),
        }
        if let Some(value) = std::env::var_os(PLUGIN_PATH_VAR) {
            for entry in std::env::split_paths(&value) {
                if entry.as_os_str().is_empty() {
                    continue;
                }
                if entry.is_dir() {
                    set.load_dir(&entry)?;
                } else if entry.exists() {
                    set.load(&entry)?;
                } else {
                    return Err(plugin_error(
                        &entry,
                        format!(
                            "listed in {PLUGIN_PATH_VAR} but no such file or directory exists; fix or remove the entry"
                        ),
                    ));
                }
            }
        }
        for path in extra {
            set.load(path)?;
        }
        Ok(set)
    }

    /// A set holding only nash-core's own types.
    pub fn core_only() -> Result<PluginSet> {
        let mut registry = Registry::new();
        nash_core::registry::register_core(&mut registry)?;
        Ok(PluginSet {
            registry,
            plugins: Vec::new(),
            files: HashSet::new(),
        })
    }

    /// Loads every plugin library (`lib*.so` defining `NASH_PLUGIN_DECLARATION`) in `dir`, in file
    /// name order. Other libraries, such as `libnash_core.so`, are skipped.
    pub fn load_dir(&mut self, dir: &Path) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut candidates: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_library_name(p.file_name()))
            .collect();
        candidates.sort();
        debug!(dir = %dir.display(), candidates = candidates.len(), "scanning for plugin libraries");
        for path in candidates {
            // A directory may hold anything named lib*.so (linker scripts, other architectures):
            // only files that parse as ELF and define the declaration are plugins.
            match ElfInfo::read(&path) {
                Ok(info) if info.declaration_size.is_some() => self.load(&path)?,
                Ok(_) => debug!(path = %path.display(), "skipped: does not define {DECLARATION_SYMBOL}"),
                Err(why) => debug!(path = %path.display(), "skipped: {why}"),
            }
        }
        Ok(())
    }

    /// Checks and loads one plugin library, and registers its types. A file already loaded into
    /// this set is skipped. On a refusal nothing of the plugin has run; if its `register` fails,
    /// the types it registered before failing stay in the registry, so callers should stop.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            plugin_error(
                path,
                format!("cannot open the plugin library ({e}); check the path in the pipeline's `plugins = [...]` or {PLUGIN_PATH_VAR}"),
            )
        })?;
        let meta = std::fs::metadata(&canonical).map_err(|e| Error::io(&canonical, e))?;
        if !meta.is_file() {
            return Err(plugin_error(
                &canonical,
                "is not a file; expected a plugin library `lib<name>.so`",
            ));
        }
        let file_id = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        if self.files.contains(&file_id) {
            debug!(path = %canonical.display(), "already loaded; skipped");
            return Ok(());
        }

        debug!(path = %canonical.display(), "checking plugin library");
        let info = ElfInfo::read(&canonical).map_err(|why| plugin_error(&canonical, why))?;
        check_elf(&info, host_abi().map_err(|why| plugin_error(&canonical, why))?)
            .map_err(|why| plugin_error(&canonical, why))?;

        // SAFETY: the checks above established that the library was built by this rustc against
        // the nash-core build loaded in this process; opening it runs its constructors.
        let library = unsafe { Library::open(Some(&canonical), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| plugin_error(&canonical, format!("the dynamic linker refused it: {e}")))?;
        // SAFETY: the symbol is a `PluginDeclaration` static of the checked size (see `check_elf`).
        let declaration: &'static PluginDeclaration = unsafe {
            let symbol = library
                .get::<*const PluginDeclaration>(DECLARATION_SYMBOL.as_bytes())
                .map_err(|e| plugin_error(&canonical, format!("cannot find {DECLARATION_SYMBOL}: {e}")))?;
            &**symbol
        };
        // Never unload: typetag's registry and every built object point into the library.
        std::mem::forget(library);
        self.files.insert(file_id);

        // SAFETY: the declaration comes from a library whose ELF checks passed; the magic is its
        // first check.
        unsafe { declaration.check_compatible() }.map_err(|why| plugin_error(&canonical, why))?;
        let name = declaration.name();
        let version = declaration.version();
        debug!(plugin = %name, version = %version, "declaration accepted; registering types");

        let before = self.registry.types().len();
        self.registry.set_current_plugin(&name);
        let register = declaration.register;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register(&mut self.registry)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let mut message = format!("plugin `{name}` {version} failed to register its types: {e}");
                for other in &self.plugins {
                    if message.contains(&format!("`{}`", other.name)) {
                        message.push_str(&format!(
                            "\n  plugin `{}` was loaded from {}",
                            other.name,
                            other.path.display()
                        ));
                    }
                }
                if self.plugins.iter().any(|p| p.name == name) {
                    message.push_str("\n  this file is a second copy of an already loaded plugin; remove one of them");
                }
                return Err(plugin_error(&canonical, message));
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic payload".into());
                return Err(plugin_error(
                    &canonical,
                    format!("plugin `{name}` {version} panicked while registering its types: {what}"),
                ));
            }
        }
        let types = self.registry.types().len() - before;
        info!(plugin = %name, version = %version, types, path = %canonical.display(), "loaded plugin");
        self.plugins.push(LoadedPlugin {
            name,
            version,
            path: canonical,
        });
        Ok(())
    }
}

fn plugin_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Plugin {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn is_library_name(name: Option<&OsStr>) -> bool {
    name.and_then(OsStr::to_str)
        .is_some_and(|n| n.starts_with("lib") && n.ends_with(".so"))
}

/// What the loader needs from a library's ELF file.
#[derive(Debug, Default)]
struct ElfInfo {
    /// `DT_NEEDED` entries.
    needed: Vec<String>,
    /// The size of the defined `NASH_PLUGIN_DECLARATION`, if it is defined.
    declaration_size: Option<u64>,
    /// Defined dynamic symbols (only collected for nash-core).
    defined: HashSet<String>,
    /// Undefined dynamic symbols whose (mangled) name mentions `nash_core`.
    core_imports: Vec<String>,
}

impl ElfInfo {
    /// Parses the 64-bit ELF shared library at `path`; the error says why it is not one.
    fn read(path: &Path) -> std::result::Result<ElfInfo, String> {
        Self::read_file(path, false)
    }

    /// [`ElfInfo::read`], keeping the defined symbols when `keep_defined`. Only the parts the
    /// loader needs are read (the headers, the dynamic section, the dynamic symbols and their
    /// strings), not the whole file: a release `libnash_core.so` with debug information is ~30
    /// MB, which read whole set every run's peak resident memory.
    fn read_file(path: &Path, keep_defined: bool) -> std::result::Result<ElfInfo, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
        let cache = object::ReadCache::new(file);
        Self::parse(&cache, keep_defined)
    }

    fn parse<'data, R: object::ReadRef<'data>>(data: R, keep_defined: bool) -> std::result::Result<ElfInfo, String> {
        let not_elf = |e: object::read::Error| format!("not a 64-bit ELF shared library ({e})");
        let header = elf::FileHeader64::<Endianness>::parse(data).map_err(not_elf)?;
        let endian = header.endian().map_err(not_elf)?;
        if header.e_type(endian) != elf::ET_DYN {
            return Err("not a shared library (ELF type is not ET_DYN); expected a plugin `lib<name>.so`".into());
        }
        let sections = header.sections(endian, data).map_err(not_elf)?;
        let mut info = ElfInfo::default();
        if let Some((entries, strings_index)) = sections.dynamic(endian, data).map_err(not_elf)? {
            let strings = sections.strings(endian, data, strings_index).map_err(not_elf)?;
            for entry in entries {
                if entry.tag32(endian) == Some(elf::DT_NEEDED) {
                    let offset = u32::try_from(Into::<u64>::into(entry.d_val(endian)))
                        .map_err(|_| "not a 64-bit ELF shared library (a DT_NEEDED offset past 4 GB)".to_string())?;
                    let name = strings.get(offset).map_err(|()| {
                        "not a 64-bit ELF shared library (a DT_NEEDED name past its string table)".to_string()
                    })?;
                    info.needed.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
        let symbols = sections.symbols(endian, data, elf::SHT_DYNSYM).map_err(not_elf)?;
        for symbol in symbols.iter() {
            let name = symbols.symbol_name(endian, symbol).map_err(not_elf)?;
            if name.is_empty() {
                continue;
            }
            let name = String::from_utf8_lossy(name);
            if symbol.is_undefined(endian) {
                if name.contains("nash_core") {
                    info.core_imports.push(name.into_owned());
                }
            } else {
                if name == DECLARATION_SYMBOL {
                    info.declaration_size = Some(symbol.st_size(endian));
                }
                if keep_defined {
                    info.defined.insert(name.into_owned());
                }
            }
        }
        Ok(info)
    }
}

/// What this process runs on: its libstd and its nash-core with that library's exported symbols.
#[derive(Debug)]
struct HostAbi {
    /// File name of the loaded `libstd-<hash>.so`.
    std_name: String,
    /// Path of the loaded `libnash_core.so`.
    core_path: PathBuf,
    /// Every symbol that `libnash_core.so` defines.
    core_symbols: HashSet<String>,
}

/// The host's ABI, read once from `/proc/self/maps` and the loaded `libnash_core.so`.
fn host_abi() -> std::result::Result<&'static HostAbi, String> {
    static HOST: OnceLock<std::result::Result<HostAbi, String>> = OnceLock::new();
    HOST.get_or_init(read_host_abi).as_ref().map_err(Clone::clone)
}

fn read_host_abi() -> std::result::Result<HostAbi, String> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps to identify this trainer's libraries: {e}"))?;
    let mapped: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| line.find('/').map(|i| &line[i..]))
        .map(|p| PathBuf::from(p.trim_end_matches(" (deleted)")))
        .collect();
    let file_name = |p: &PathBuf| p.file_name().and_then(OsStr::to_str).map(str::to_string);
    let std_name = mapped
        .iter()
        .filter_map(file_name)
        .find(|n| n.starts_with("libstd-") && n.ends_with(".so"))
        .ok_or_else(|| {
            "this trainer links Rust's std statically, so no plugin can share it; rebuild the trainer with \
             `-C prefer-dynamic` (the workspace's .cargo/config.toml sets it)"
                .to_string()
        })?;
    let core_path = mapped
        .iter()
        .find(|p| file_name(p).as_deref() == Some("libnash_core.so"))
        .cloned()
        .ok_or_else(|| {
            "this trainer does not link libnash_core.so dynamically, so no plugin can share it; rebuild the \
             trainer with `-C prefer-dynamic` (the workspace's .cargo/config.toml sets it)"
                .to_string()
        })?;
    let core = ElfInfo::read_file(&core_path, true).map_err(|e| format!("{}: {e}", core_path.display()))?;
    debug!(std = %std_name, core = %core_path.display(), symbols = core.defined.len(), "host ABI");
    Ok(HostAbi {
        std_name,
        core_path,
        core_symbols: core.defined,
    })
}

/// The checks made before a plugin is opened; the error says what differs and how to rebuild.
fn check_elf(info: &ElfInfo, host: &HostAbi) -> std::result::Result<(), String> {
    let expected_size = std::mem::size_of::<PluginDeclaration>() as u64;
    match info.declaration_size {
        None => {
            return Err(format!(
                "not a nash plugin: it does not export `{DECLARATION_SYMBOL}`; a plugin crate is a `cdylib` that \
                 calls `nash_core::declare_plugin!(register)`"
            ))
        }
        Some(size) if size != expected_size => {
            return Err(format!(
                "its `{DECLARATION_SYMBOL}` is {size} bytes but this trainer's declaration is {expected_size} bytes: \
                 it was built against another nash-core; {REBUILD_HINT}"
            ))
        }
        Some(_) => {}
    }
    let std_needed: Vec<&str> = info
        .needed
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with("libstd-"))
        .collect();
    if !std_needed.contains(&host.std_name.as_str()) {
        return Err(if std_needed.is_empty() {
            format!(
                "it links Rust's std statically (built without `-C prefer-dynamic`), so it cannot share this \
                 trainer's {}; build it with the workspace's .cargo/config.toml (`-C prefer-dynamic -C rpath`); \
                 {REBUILD_HINT}",
                host.std_name
            )
        } else {
            format!(
                "it links {} but this trainer runs on {}: it was built by another rustc; use the toolchain pinned in \
                 rust-toolchain.toml; {REBUILD_HINT}",
                std_needed.join(", "),
                host.std_name
            )
        });
    }
    if !info.needed.iter().any(|n| n == "libnash_core.so") {
        return Err(format!(
            "it does not link libnash_core.so: it carries its own static copy of nash-core (or none), so its types \
             would live in another typetag registry and its tensors in another dfdx; make it a `cdylib` that \
             depends on nash-core, built with `-C prefer-dynamic`; {REBUILD_HINT}"
        ));
    }
    debug!(
        imports = info.core_imports.len(),
        "plugin links {} and libnash_core.so", host.std_name
    );
    let missing: Vec<&String> = info
        .core_imports
        .iter()
        .filter(|s| !host.core_symbols.contains(s.as_str()))
        .collect();
    if let Some(first) = missing.first() {
        return Err(format!(
            "it was built against another nash-core build: {} of its {} nash-core imports are not defined by the \
             loaded {} (the hash in Rust's mangled names differs), e.g. `{first}`. A plugin crate built outside \
             the trainer's workspace, or with another profile, Cargo.lock or nash-core revision, gets its own \
             nash-core build; {REBUILD_HINT}",
            missing.len(),
            info.core_imports.len(),
            host.core_path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_names() {
        assert!(is_library_name(Some(OsStr::new("libnash_gan.so"))));
        assert!(!is_library_name(Some(OsStr::new("nash_gan.so"))));
        assert!(!is_library_name(Some(OsStr::new("libnash_gan.rlib"))));
        assert!(!is_library_name(None));
    }

    #[test]
    fn host_abi_is_found() {
        let host = host_abi().expect("the test binary links std and nash-core dynamically");
        assert!(host.std_name.starts_with("libstd-"));
        assert!(host.core_symbols.contains("NASH_CORE_ANCHOR"));
    }

    #[test]
    fn non_elf_is_refused() {
        let err = ElfInfo::parse(&b"INPUT(-lfoo)\n"[..], false).unwrap_err();
        assert!(err.contains("not a 64-bit ELF"), "{err}");
    }
}
