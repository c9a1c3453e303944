//! A test's scratch directory: removed when the test passes, kept when it fails, so that a
//! passing run leaves nothing in the temporary directory and a failure's logs can be read.

use std::path::Path;

/// A directory under the system's temporary directory, removed when dropped unless the thread
/// is panicking (a failing test): then it is kept and its path printed.
#[derive(Debug)]
pub struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    /// A fresh directory whose name starts with `prefix`.
    ///
    /// # Panics
    /// When the temporary directory cannot be written (nothing else in a test could run).
    #[must_use]
    #[allow(clippy::expect_used)]
    pub fn new(prefix: &str) -> Self {
        Self(Some(
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .expect("a scratch directory under the temporary directory"),
        ))
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new(""), tempfile::TempDir::path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && std::thread::panicking()
        {
            eprintln!("kept for the failed test: {}", dir.keep().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Scratch;

    #[test]
    fn a_passing_test_leaves_nothing_and_a_failing_one_keeps_its_directory() {
        let passing = Scratch::new("fleet-access-scratch-test-");
        let path = passing.path().to_owned();
        assert!(path.is_dir());
        drop(passing);
        assert!(!path.exists());

        let kept = std::thread::spawn(|| {
            let failing = Scratch::new("fleet-access-scratch-test-");
            let path = failing.path().to_owned();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _held = failing;
                panic!("the test fails");
            }))
            .expect_err("it panicked");
            path
        })
        .join()
        .expect("the thread ends");
        assert!(kept.is_dir(), "{}", kept.display());
        std::fs::remove_dir_all(&kept).expect("removed");
    }
}
