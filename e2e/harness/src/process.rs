//! A service binary run as a child process that a test can SIGKILL, stop
//! gracefully and start again with the same settings.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the workspace's binaries are: `SAGA_BIN_DIR`, else the profile
/// folder of the running test executable (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SAGA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current executable path");
    let mut dir = exe.parent().expect("executable folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub struct ServiceProcess {
    name: String,
    program: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl ServiceProcess {
    /// Starts binary `name` with `env`, appending its output to `log`.
    pub fn start(name: &str, env: Vec<(String, String)>, log: PathBuf) -> anyhow::Result<Self> {
        ServiceProcess::start_in(&bin_dir(), name, env, log)
    }

    /// Starts binary `name` of the build in `dir` (another build's, to set
    /// beside this one) with `env`, appending its output to `log`.
    pub fn start_in(
        dir: &Path,
        name: &str,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let program = dir.join(name);
        anyhow::ensure!(
            program.exists(),
            "{} is missing: build the binaries first (cargo build --workspace --bins)",
            program.display()
        );
        let mut process = ServiceProcess {
            name: name.to_owned(),
            program,
            env,
            log,
            child: None,
        };
        process.restart()?;
        Ok(process)
    }

    /// A second instance of the same binary with the same settings but
    /// `overrides` (e.g. another GRPC_ADDR), logging to `log`.
    pub fn twin(&self, overrides: &[(&str, String)], log: PathBuf) -> anyhow::Result<Self> {
        let mut env = self.env.clone();
        for (key, value) in overrides {
            env.retain(|(k, _)| k != key);
            env.push(((*key).to_owned(), value.clone()));
        }
        let dir = self.program.parent().expect("a binary's folder");
        ServiceProcess::start_in(dir, &self.name, env, log)
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its output goes.
    pub fn log(&self) -> &std::path::Path {
        &self.log
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Starts the process again if it is not running.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as in a crash.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `grace` for a clean exit before SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + grace;
            while std::time::Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    self.child = None;
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
