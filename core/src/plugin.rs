//! The plugin ABI: what a plugin library exports, and the checks the trainer makes before it
//! runs any of the plugin's code.
//!
//! Rust has no stable ABI. A plugin is a `cdylib` that links this crate's dylib; it is only
//! sound to call if it was built by the same rustc against the very same nash-core build, and
//! did not link a second copy of nash-core. A plugin declares itself with
//! [`declare_plugin!`], which exports a `#[repr(C)]` [`PluginDeclaration`] named
//! `NASH_PLUGIN_DECLARATION`: C strings describing the nash-core it was compiled against (the
//! constants below are inlined into the plugin at its compile time) and the address of
//! [`NASH_CORE_ANCHOR`] as the plugin's dynamic linker resolved it. The loader compares all of that
//! with its own values ([`PluginDeclaration::check_compatible`]) before calling `register`.

use std::ffi::{c_char, CStr};

use crate::error::Result;
use crate::registry::Registry;

/// Bytes every declaration starts with.
pub const MAGIC: [u8; 8] = *b"NASHPLG\0";
/// Version of the [`PluginDeclaration`] layout and of the registration protocol.
pub const ABI_VERSION: u32 = 1;
/// The exported symbol name of the declaration.
pub const DECLARATION_SYMBOL: &str = "NASH_PLUGIN_DECLARATION";
/// The rustc that built nash-core (`rustc 1.95.0 (59807616e 2026-04-14)`), NUL-terminated.
pub const RUSTC_VERSION: &str = concat!(env!("NASH_RUSTC_VERSION"), "\0");
/// nash-core's package version, NUL-terminated.
pub const CORE_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
/// nash-core's enabled features, comma-separated, NUL-terminated.
pub const CORE_FEATURES: &str = concat!(env!("NASH_CORE_FEATURES"), "\0");
/// Hash of nash-core's source, manifest, features and rustc, NUL-terminated.
pub const CORE_FINGERPRINT: &str = concat!(env!("NASH_CORE_FINGERPRINT"), "\0");

/// A static whose address identifies the loaded copy of nash-core: a plugin that resolves it to
/// another address carries a second copy.
#[no_mangle]
pub static NASH_CORE_ANCHOR: u8 = 0;

/// The signature of a plugin's registration function: it registers every type the plugin brings.
pub type RegisterFn = fn(&mut Registry) -> Result<()>;

/// What a plugin exports, `#[repr(C)]` so the fields the loader checks first have a fixed layout.
#[repr(C)]
pub struct PluginDeclaration {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_VERSION`] of the nash-core the plugin was compiled against.
    pub abi_version: u32,
    /// [`RUSTC_VERSION`] of that nash-core.
    pub rustc_version: *const c_char,
    /// [`CORE_VERSION`] of that nash-core.
    pub core_version: *const c_char,
    /// [`CORE_FEATURES`] of that nash-core.
    pub core_features: *const c_char,
    /// [`CORE_FINGERPRINT`] of that nash-core.
    pub core_fingerprint: *const c_char,
    /// The address of [`NASH_CORE_ANCHOR`] as the plugin sees it.
    pub core_anchor: *const u8,
    /// The plugin's name (its package name), NUL-terminated.
    pub name: *const c_char,
    /// The plugin's version, NUL-terminated.
    pub version: *const c_char,
    /// Registers the plugin's types. Only called after every check passed.
    pub register: RegisterFn,
}

// SAFETY: the pointers point at immutable statics inside the plugin and core images.
unsafe impl Sync for PluginDeclaration {}

/// The host's own values, as a plugin built against this nash-core would declare them.
pub fn host_values() -> [(&'static str, &'static str); 4] {
    [
        ("rustc", trim(RUSTC_VERSION)),
        ("nash-core version", trim(CORE_VERSION)),
        ("nash-core features", trim(CORE_FEATURES)),
        ("nash-core source fingerprint", trim(CORE_FINGERPRINT)),
    ]
}

fn trim(s: &'static str) -> &'static str {
    s.trim_end_matches('\0')
}

/// Reads a NUL-terminated string from a declaration field, or `<null>`.
///
/// # Safety
/// `p` must be null or point at a NUL-terminated string that outlives the call.
pub unsafe fn read_c_str(p: *const c_char) -> String {
    if p.is_null() {
        "<null>".into()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

impl PluginDeclaration {
    /// The plugin's name.
    pub fn name(&self) -> String {
        // SAFETY: set by `declare_plugin!` to a NUL-terminated static.
        unsafe { read_c_str(self.name) }
    }
    /// The plugin's version.
    pub fn version(&self) -> String {
        // SAFETY: as above.
        unsafe { read_c_str(self.version) }
    }
    /// Checks that the plugin was built by this rustc against this very nash-core, and links the
    /// same loaded copy of it. The error lists every difference and says how to rebuild.
    ///
    /// # Safety
    /// `self` must be a declaration read from a loaded library whose magic matched [`MAGIC`].
    pub unsafe fn check_compatible(&self) -> std::result::Result<(), String> {
        if self.magic != MAGIC {
            return Err("the `NASH_PLUGIN_DECLARATION` symbol is not a nash plugin declaration (bad magic)".into());
        }
        if self.abi_version != ABI_VERSION {
            return Err(format!(
                "plugin ABI version {} but this trainer speaks version {ABI_VERSION}; rebuild the plugin against this nash",
                self.abi_version
            ));
        }
        let theirs = [
            read_c_str(self.rustc_version),
            read_c_str(self.core_version),
            read_c_str(self.core_features),
            read_c_str(self.core_fingerprint),
        ];
        let mut diffs = Vec::new();
        for ((what, ours), theirs) in host_values().iter().zip(theirs.iter()) {
            if ours != theirs {
                diffs.push(format!(
                    "{what}: plugin was built against `{theirs}`, this trainer has `{ours}`"
                ));
            }
        }
        if !std::ptr::eq(self.core_anchor, &NASH_CORE_ANCHOR) {
            diffs.push(
                "the plugin carries its own copy of nash-core instead of linking the trainer's libnash_core \
                 (build it with `-C prefer-dynamic`, as the workspace's .cargo/config.toml sets)"
                    .into(),
            );
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "built against a different nash-core build:\n  - {}\nRebuild the plugin with the trainer's toolchain \
                 (rust-toolchain.toml) and the same nash-core (same git revision or registry version and Cargo.lock), \
                 e.g. `cargo build --release` in a crate that depends on nash-core the way the plugin guide says.",
                diffs.join("\n  - ")
            ))
        }
    }
}

/// Declares a plugin library: `nash_core::declare_plugin!(register);` where
/// `fn register(registry: &mut Registry) -> nash_core::Result<()>` registers every type.
/// The package name and version are taken from Cargo.
#[macro_export]
macro_rules! declare_plugin {
    ($register:path) => {
        #[no_mangle]
        #[used]
        pub static NASH_PLUGIN_DECLARATION: $crate::plugin::PluginDeclaration = $crate::plugin::PluginDeclaration {
            magic: $crate::plugin::MAGIC,
            abi_version: $crate::plugin::ABI_VERSION,
            rustc_version: $crate::plugin::RUSTC_VERSION.as_ptr() as *const ::std::ffi::c_char,
            core_version: $crate::plugin::CORE_VERSION.as_ptr() as *const ::std::ffi::c_char,
            core_features: $crate::plugin::CORE_FEATURES.as_ptr() as *const ::std::ffi::c_char,
            core_fingerprint: $crate::plugin::CORE_FINGERPRINT.as_ptr() as *const ::std::ffi::c_char,
            core_anchor: &$crate::plugin::NASH_CORE_ANCHOR as *const u8,
            name: concat!(env!("CARGO_PKG_NAME"), "\0").as_ptr() as *const ::std::ffi::c_char,
            version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const ::std::ffi::c_char,
            register: $register,
        };
    };
}
