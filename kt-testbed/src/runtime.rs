//! The runtime the testbed serves from: worker threads of its own, so that a test that
//! blocks its own runtime (kubectl and curl through `std::process::Command`) can never
//! starve the API server, the controllers, the kubelets, the kube-proxies or the DNS.

use std::{future::Future, io};

use tokio::runtime::{Builder, Runtime};

/// A multi-threaded tokio runtime on threads named after the testbed; shut down (without
/// waiting for stragglers) when dropped, from any context.
#[derive(Debug)]
pub struct OwnRuntime(Option<Runtime>);

impl OwnRuntime {
    /// Two worker threads: the build machines have two cores.
    pub fn new(thread_name: &str) -> io::Result<Self> {
        Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(thread_name)
            .enable_all()
            .build()
            .map(|runtime| Self(Some(runtime)))
    }

    /// A new runtime, and what `start` returned when run on it: the way to start something
    /// that serves from a runtime of its own.
    pub async fn start<T, F>(thread_name: &str, start: F) -> io::Result<(Self, T)>
    where
        F: Future<Output = io::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let runtime = Self::new(thread_name)?;
        let started = runtime.run(start).await?;
        Ok((runtime, started))
    }

    /// Runs `work` on this runtime and waits for it from the caller's; a panic in `work`
    /// resumes in the caller.
    pub async fn run<F>(&self, work: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.0.as_ref().expect("present until drop");
        match runtime.spawn(work).await {
            Ok(output) => output,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("testbed task cancelled: {e}"),
        }
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
