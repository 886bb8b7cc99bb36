//! Records what a plugin must match to be loaded: the rustc that built nash-core, and a
//! fingerprint of nash-core's source and features.

use std::path::Path;
use std::process::Command;

fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

fn hash_dir(dir: &Path, hash: &mut u64) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read core source dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            hash_dir(&path, hash);
        } else if path.extension().is_some_and(|e| e == "rs") {
            fnv1a(
                hash,
                path.strip_prefix(env_dir())
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .as_bytes(),
            );
            fnv1a(hash, &std::fs::read(&path).expect("read core source file"));
        }
    }
}

fn env_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
}

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(&rustc)
        .arg("-vV")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown rustc".into());
    println!("cargo:rustc-env=NASH_RUSTC_VERSION={version}");

    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(|f| f.to_lowercase()))
        .collect();
    features.sort();
    println!("cargo:rustc-env=NASH_CORE_FEATURES={}", features.join(","));

    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let dir = env_dir();
    hash_dir(&dir.join("src"), &mut hash);
    fnv1a(
        &mut hash,
        &std::fs::read(dir.join("Cargo.toml")).expect("read Cargo.toml"),
    );
    fnv1a(&mut hash, features.join(",").as_bytes());
    fnv1a(&mut hash, version.as_bytes());
    println!("cargo:rustc-env=NASH_CORE_FINGERPRINT={hash:016x}");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
}
