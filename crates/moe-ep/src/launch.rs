//! One process per GPU: a launcher makes the NCCL id and starts `world` copies of a
//! program, each told its rank, the world size and the id through the environment
//! (what `torchrun` and serving stacks' launchers do); each process reads them back
//! with [`RankEnv::from_env`].

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{EpError, NcclId, Result};

/// The environment variable holding a process's rank.
pub const RANK_VAR: &str = "MOE_EP_RANK";
/// The environment variable holding the number of ranks.
pub const WORLD_VAR: &str = "MOE_EP_WORLD";
/// The environment variable holding the NCCL id, as [`NcclId::to_hex`] writes it.
pub const ID_VAR: &str = "MOE_EP_NCCL_ID";

/// What a launched process is told.
#[derive(Clone, Debug)]
pub struct RankEnv {
    /// This process's rank; it runs on GPU `rank`.
    pub rank: usize,
    /// The number of ranks.
    pub world: usize,
    /// The communicator's id.
    pub id: NcclId,
}

impl RankEnv {
    /// The rank's settings, or `None` when this process was not started by
    /// [`spawn_ranks`] (the variables are absent).
    pub fn from_env() -> Result<Option<Self>> {
        let var = |name: &str| std::env::var(name).ok();
        let (Some(rank), Some(world), Some(id)) = (var(RANK_VAR), var(WORLD_VAR), var(ID_VAR))
        else {
            return Ok(None);
        };
        let number = |name: &str, text: &str| {
            text.parse::<usize>()
                .map_err(|_| EpError::Shape(format!("{name}={text:?} is not a number")))
        };
        Ok(Some(Self {
            rank: number(RANK_VAR, &rank)?,
            world: number(WORLD_VAR, &world)?,
            id: NcclId::from_hex(&id)?,
        }))
    }
}

/// Runs `world` copies of `command` (built fresh for each rank by `command`), each
/// with [`RANK_VAR`], [`WORLD_VAR`] and [`ID_VAR`] set and NCCL's NVLink multicast
/// off (`NCCL_NVLS_ENABLE=0`, as the machines this runs on require), and waits for
/// all of them; their outputs come back in rank order.
///
/// A rank that fails leaves the others waiting in NCCL for it forever, so when one
/// exits unsuccessfully the others are killed; all are killed after `timeout`.
pub fn spawn_ranks(
    world: usize,
    timeout: Duration,
    command: impl Fn(usize) -> Command,
) -> Result<Vec<Output>> {
    let id = NcclId::new()?.to_hex();
    let mut children = Vec::with_capacity(world);
    for rank in 0..world {
        let mut child = command(rank);
        child
            .env(RANK_VAR, rank.to_string())
            .env(WORLD_VAR, world.to_string())
            .env(ID_VAR, &id)
            .env("NCCL_NVLS_ENABLE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match child.spawn() {
            Ok(child) => children.push(Supervised::new(child)),
            Err(error) => {
                for child in &mut children {
                    child.kill();
                }
                return Err(EpError::Shape(format!(
                    "could not start rank {rank}: {error}"
                )));
            }
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut running = 0;
        let mut failed = false;
        for child in &mut children {
            match child.poll() {
                None => running += 1,
                Some(status) => failed |= !status.success(),
            }
        }
        if running == 0 {
            break;
        }
        if failed || Instant::now() >= deadline {
            for child in &mut children {
                child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(children.into_iter().map(Supervised::output).collect())
}

/// A child whose output is read as it comes (a full pipe would stop it).
struct Supervised {
    child: Child,
    status: Option<ExitStatus>,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
}

impl Supervised {
    fn new(mut child: Child) -> Self {
        fn drain(mut pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(pipe) = pipe.as_mut() {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        }
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        Self {
            child,
            status: None,
            stdout,
            stderr,
        }
    }

    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn kill(&mut self) {
        if self.poll().is_none() {
            let _ = self.child.kill();
        }
    }

    fn output(mut self) -> Output {
        let status = match self.status {
            Some(status) => status,
            None => self
                .child
                .wait()
                .unwrap_or_else(|_| ExitStatus::from_raw(-1)),
        };
        Output {
            status,
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }
}
