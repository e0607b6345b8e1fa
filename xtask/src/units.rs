//! Checks the systemd unit files in `lookup-user/systemd` with
//! `systemd-analyze verify`.
//!
//! verify wants every `ExecStart=` program to exist, and the units name the
//! installed paths (`/usr/local/bin/lookupd`). So it reads copies in a
//! scratch directory whose `/usr/local/bin/` paths point at the binaries just
//! built. verify needs no running systemd (it works in containers).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Where the unit files name the binaries.
const INSTALLED_BIN_DIR: &str = "/usr/local/bin/";

/// The unit files, sorted.
fn unit_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut units = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let is_unit = path.extension().is_some_and(|ext| {
            ["service", "socket", "mount", "target"].contains(&&*ext.to_string_lossy())
        });
        if is_unit {
            units.push(path);
        }
    }
    units.sort();
    Ok(units)
}

/// The unit text with installed binary paths pointing into `bin_dir`.
fn rewrite(text: &str, bin_dir: &Path) -> String {
    let bin_dir = format!("{}/", bin_dir.display());
    text.replace(INSTALLED_BIN_DIR, &bin_dir)
}

/// Verifies every unit file; warnings count as failures.
pub fn verify(bin_dir: &Path) -> Result<()> {
    let source = cmd::workspace_root().join("lookup-user/systemd");
    let units = unit_files(&source)?;
    if units.is_empty() {
        bail!("no unit files in {}", source.display());
    }
    let scratch = cmd::target_dir().join("xtask/systemd-verify");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot remove {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let mut copies = Vec::new();
    for unit in &units {
        let text =
            fs::read_to_string(unit).with_context(|| format!("cannot read {}", unit.display()))?;
        // Same file name: units find each other (Sockets=, BindsTo=) by it.
        let copy = scratch.join(unit.file_name().context("unit without a name")?);
        fs::write(&copy, rewrite(&text, bin_dir))
            .with_context(|| format!("cannot write {}", copy.display()))?;
        copies.push(copy);
    }

    let mut verify = Command::new("systemd-analyze");
    verify
        .args(["verify", "--man=no", "--recursive-errors=one"])
        .args(&copies)
        .current_dir(&scratch);
    let line = format!(
        "systemd-analyze verify {} (copies in {} with {INSTALLED_BIN_DIR} -> {}/)",
        units
            .iter()
            .filter_map(|u| u.strip_prefix(cmd::workspace_root()).ok())
            .map(|u| u.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        scratch.display(),
        bin_dir.display(),
    );
    eprintln!("$ {line}");
    let out = verify
        .output()
        .context("cannot run systemd-analyze (Debian package systemd)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stdout}{stderr}");
    if !out.status.success() || !stderr.trim().is_empty() {
        bail!(
            "systemd-analyze verify found problems in the unit files ({})",
            out.status
        );
    }
    println!("units: {} unit files verified", copies.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_points_installed_binaries_at_the_build() {
        let unit = "ExecStart=/usr/local/bin/lookupd --control /run/x.sock\n\
                    ExecStartPost=/usr/local/bin/lookupctl register web\n\
                    ExecStartPre=/bin/sh -c true\n";
        assert_eq!(
            rewrite(unit, Path::new("/w/target/debug")),
            "ExecStart=/w/target/debug/lookupd --control /run/x.sock\n\
             ExecStartPost=/w/target/debug/lookupctl register web\n\
             ExecStartPre=/bin/sh -c true\n"
        );
    }

    #[test]
    fn shipped_units_name_the_installed_binaries() {
        let dir = cmd::workspace_root().join("lookup-user/systemd");
        let agent = fs::read_to_string(dir.join("lookupd.service")).expect("lookupd.service");
        assert!(
            agent.contains("ExecStart=/usr/local/bin/lookupd"),
            "lookupd.service must start /usr/local/bin/lookupd"
        );
        let names: Vec<_> = unit_files(&dir)
            .expect("list units")
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        for want in [
            "lookupd.service",
            "example-echo.socket",
            "example-echo.service",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "missing {want} in {names:?}"
            );
        }
    }
}
