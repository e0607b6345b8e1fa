//! Running commands, and where the workspace and its build output are.
use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root: the parent of this crate.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (or `CARGO_BUILD_TARGET_DIR`)
/// if set, taken relative to the workspace root, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .into_iter()
        .find_map(env::var_os)
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// A `cargo` command in the workspace root. It is the cargo that runs this
/// xtask (`$CARGO`), so nested builds use the same toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// The command line as a person would type it into a shell.
pub fn display(cmd: &Command) -> String {
    let mut line: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.display(), quote(v?))))
        .collect();
    let program = Path::new(cmd.get_program());
    // `$CARGO` is a full path into the toolchain; people type `cargo`.
    if program.file_name() == Some(OsStr::new("cargo")) {
        line.push("cargo".into());
    } else {
        line.push(quote(program.as_os_str()));
    }
    line.extend(cmd.get_args().map(quote));
    line.join(" ")
}

/// `word` as a shell word: as it is if that is safe, else in single quotes.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Prints the command, runs it with inherited stdio and fails unless it
/// exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a program quietly and returns its stdout if it exits 0; `None` if it
/// is missing or fails. For probes, where failure means "not there".
pub fn probe<I, S>(program: &str, args: I) -> Option<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("rustup");
        cmd.env("FLAGS", r#"--cfg=arch="x86_64""#)
            .args(["run", "it's", "", "-D", "warnings"]);
        assert_eq!(
            display(&cmd),
            r#"FLAGS='--cfg=arch="x86_64"' rustup run 'it'\''s' '' -D warnings"#
        );
    }
}
