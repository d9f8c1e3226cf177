//! A temporary directory removed on drop.

use std::{
    io,
    path::{Path, PathBuf},
};

#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// `$TMPDIR/<unique name>`, created now.
    pub fn new(kind: &str) -> io::Result<Self> {
        let path = std::env::temp_dir().join(super::unique_name(kind));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Keeps the directory (for `kt-testbed up`, whose state outlives the process).
    pub fn keep(self) -> PathBuf {
        let path = self.0.clone();
        std::mem::forget(self);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
