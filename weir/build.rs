//! Bakes the source commit into the binary, so `weir --version` says what was built (`weir 0.1.0 (abc1234)`, with
//! `-dirty` when the workspace's crates or manifests differed from that commit, tracked or untracked files alike) and benchmark records can name the measured
//! binary rather than whatever the tree holds when the record is written. Outside a git checkout (a source tarball)
//! the commit is `unknown`.
//!
//! Plain `git` rather than a crate such as vergen: three read-only commands, no dependency to keep.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    // `--no-optional-locks`: `git status` would otherwise refresh and rewrite the index, which this script watches,
    // and every build would rerun it.
    let out = Command::new("git")
        .arg("--no-optional-locks")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();
    // What the binary is built from: the workspace's crates (every top-level directory with a Cargo.toml) and its
    // manifests. Not target/, docs or results: editing the README does not change the binary.
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    sources.sort();
    sources.extend(["Cargo.toml", "Cargo.lock"].map(|f| root.join(f)));
    let commit = match git(&manifest, &["rev-parse", "--short", "HEAD"]) {
        Some(hash) if !hash.is_empty() => {
            // Any change to those sources, tracked or not (outside ignored paths), marks the build dirty: a new
            // untracked module is as much a difference from the commit as an edited one.
            let mut status = vec![
                "status".to_owned(),
                "--porcelain".to_owned(),
                "--".to_owned(),
            ];
            status.extend(sources.iter().map(|p| p.display().to_string()));
            let status: Vec<&str> = status.iter().map(String::as_str).collect();
            let dirty = git(&manifest, &status).is_none_or(|s| !s.is_empty());
            format!("{hash}{}", if dirty { "-dirty" } else { "" })
        }
        _ => "unknown".to_owned(),
    };
    println!("cargo:rustc-env=WEIR_VERSION={version} ({commit})");

    // Rerun when HEAD moves (a commit, a checkout) or the index changes (staging), and when any crate's sources
    // change, so that `-dirty` appears or goes away with the edit that caused it. In a worktree `--git-path` resolves
    // HEAD and the index to the worktree's own files and the branch ref to the shared repository.
    let mut watch: Vec<String> = ["HEAD", "index", "packed-refs"]
        .iter()
        .filter_map(|p| git(&manifest, &["rev-parse", "--git-path", p]))
        .collect();
    if let Some(branch) = git(&manifest, &["symbolic-ref", "-q", "HEAD"]) {
        watch.extend(git(&manifest, &["rev-parse", "--git-path", &branch]));
    }
    for p in watch {
        let p = PathBuf::from(p);
        // `--git-path` answers relative to the directory git ran in.
        let p = if p.is_absolute() { p } else { manifest.join(p) };
        println!("cargo:rerun-if-changed={}", p.display());
    }
    for p in &sources {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
