//! The stand-in VMM process: cloud-hypervisor's REST API on a Unix socket (hyper 1),
//! its state machine, the serial file and the VMM side of hybrid vsock.
//!
//! # State table
//!
//! Modelled on cloud-hypervisor's `vmm/src/lib.rs` (`Vmm::vm_*`) and `vm.rs`
//! (`VmState::valid_transition`). "config" is the stored `VmConfig` (set by
//! `vm.create` or `vm.restore`), "vm" the booted machine (Running or Paused).
//!
//! | request            | no config          | config, no vm        | vm Running        | vm Paused          |
//! |--------------------|--------------------|----------------------|-------------------|--------------------|
//! | `vm.create`        | store, 204         | 500 already created  | 500               | 500                |
//! | `vm.boot`          | 404 config missing | boot → Running, 204  | 500 already created | 500              |
//! | `vm.info`          | 404 not created    | 200, state Created   | 200 Running       | 200 Paused         |
//! | `vm.pause`         | 500 not running    | 500 not running      | → Paused, 204     | 500 bad transition |
//! | `vm.resume`        | 500 not running    | 500 not running      | 500 bad transition| → Running, 204     |
//! | `vm.power-button`  | 500 not running    | 500 not running      | 204, guest powers off (process exits) | 204, acted on at resume |
//! | `vm.shutdown`      | 500 not running    | 500 not running      | drop vm, 204      | drop vm, 204       |
//! | `vm.resize`        | 404 not created    | edit config, 204     | apply, 204/500    | apply, 204/500     |
//! | `vm.snapshot`      | 500 not running    | 500 not running      | 500 "Trying to snapshot while VM is running" | write dir, 204 |
//! | `vm.restore`       | load dir → Paused, 204 | 500 already created | 500            | 500                |
//! | `vm.delete`        | 204                | clear config, 204    | drop vm + config, 204 | same           |
//! | `vmm.ping`         | 200                | 200                  | 200               | 200                |
//! | `vmm.shutdown`     | 200, exit          | 200, exit            | 200, exit         | 200, exit          |
//!
//! Before any of that, as in cloud-hypervisor's HTTP layer: an unknown path is 404
//! `["Not Found"]`, a method the spec does not list for the path is 400
//! `["Bad Request"]`, a missing required body is 400, and a body that is not JSON
//! or does not match the spec's schema is 400 `["Failed to deserialize JSON", ...]`.
//! Error bodies are JSON arrays of the error chain, as cloud-hypervisor sends them;
//! status 404 only for "not created"/"config missing", 500 otherwise (which is what
//! cloud-hypervisor's `api_error_status_code` does, although the spec also lists
//! 405 for some). `vmm.shutdown` answers 200 with no body, as cloud-hypervisor's
//! handler does (the spec says 204). 200 replies are validated against the spec's
//! response schema before they are sent.
//!
//! Boot checks what cloud-hypervisor checks and vmkit could get wrong: max vCPUs at
//! least boot vCPUs, a file for a serial port in File mode, a kernel, initramfs and
//! disks that open. Messages copied from cloud-hypervisor's source where the chain is
//! short; the device errors are approximations. Endpoints vmkit does not use answer
//! 500 "not implemented by the stand-in".
//!
//! Like cloud-hypervisor releases before the API-socket lock, the stand-in refuses
//! to start when its API socket path exists (bind fails: "Address in use"); it
//! removes the socket when it exits normally. Every request is appended to
//! `standin-requests.jsonl` beside the API socket so tests can check what was sent.

use std::convert::Infallible;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use vmkit_core::guest::{ServerConfig, VSOCK_PORT, serve};

use super::Behaviour;
use super::agent::StandinAgent;
use super::schema::{Lookup, Spec};

const MIB: u64 = 1 << 20;
/// cloud-hypervisor's ACPI memory hotplug granularity.
const HOTPLUG_STEP: u64 = 128 * MIB;
/// cloud-hypervisor's first local port for host-initiated vsock connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

type Reply = Response<Full<Bytes>>;

/// What new vsock connections wait on.
#[derive(Clone, Copy, Debug)]
struct Gate {
    paused: bool,
    agent_ready_at: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
}

/// A booted machine.
struct Vm {
    state: RunState,
    gate: watch::Sender<Gate>,
    vsock_task: JoinHandle<()>,
    /// Removed when the VM goes away, as cloud-hypervisor's vsock device does.
    vsock_path: Option<PathBuf>,
    current_ram: u64,
    boot_ram: u64,
    hotplug: u64,
    power_off_pending: bool,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.vsock_task.abort();
        if let Some(path) = &self.vsock_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[derive(Default)]
struct Vmm {
    config: Option<Value>,
    vm: Option<Vm>,
}

/// The stand-in process's shared state.
pub struct Standin {
    spec: Spec,
    behaviour: Behaviour,
    vmm: Mutex<Vmm>,
    exit: watch::Sender<Option<i32>>,
    next_port: AtomicU32,
    request_log: PathBuf,
    boot_count: AtomicU32,
    /// Where `--event-monitor path=...` asked for events, if it did.
    event_monitor: Option<PathBuf>,
}

fn reply(status: u16, body: Option<Value>) -> Reply {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("server", "Cloud Hypervisor API (vmkit stand-in)")
        .header("content-type", "application/json");
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    builder = builder.header("content-length", body.len());
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn no_content() -> Reply {
    reply(204, None)
}

fn error(status: u16, chain: &[&str]) -> Reply {
    reply(status, Some(json!(chain)))
}

fn api_error(status: u16, outer: &str, rest: &[&str]) -> Reply {
    let mut chain = vec!["Error from API", outer];
    chain.extend_from_slice(rest);
    error(status, &chain)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn u64_at(v: &Value, pointer: &str) -> Option<u64> {
    v.pointer(pointer).and_then(Value::as_u64)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// Parses `--api-socket path=X`, `--api-socket X` or `--api-socket=path=X`.
pub fn api_socket_from_args(args: &[String]) -> Option<PathBuf> {
    path_option(args, "--api-socket")
}

/// The path of option `name` (`name path=X`, `name X` or `name=path=X`).
fn path_option(args: &[String], name: &str) -> Option<PathBuf> {
    let with_equals = format!("{name}=");
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = if arg == name {
            it.next()?.clone()
        } else if let Some(v) = arg.strip_prefix(&with_equals) {
            v.to_owned()
        } else {
            continue;
        };
        let path = value
            .split(',')
            .find_map(|part| part.strip_prefix("path="))
            .unwrap_or(&value);
        return Some(PathBuf::from(path));
    }
    None
}

/// Runs the stand-in until it is shut down; returns the process's exit code.
pub fn run(args: &[String], behaviour: Behaviour) -> i32 {
    let Some(api_socket) = api_socket_from_args(args) else {
        eprintln!("Error: the stand-in needs --api-socket path=<socket> (got {args:?})");
        return 1;
    };
    let spec = match Spec::load() {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("Error: {e}");
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start a runtime: {e}");
            return 1;
        }
    };
    let event_monitor = path_option(args, "--event-monitor");
    runtime.block_on(serve_api(api_socket, spec, behaviour, event_monitor))
}

async fn serve_api(
    api_socket: PathBuf,
    spec: Spec,
    behaviour: Behaviour,
    event_monitor: Option<PathBuf>,
) -> i32 {
    let listener = match UnixListener::bind(&api_socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("Error: Failed to create API server socket: {e}");
            return 1;
        }
    };
    let (exit, mut exit_rx) = watch::channel(None);
    let request_log = api_socket.with_file_name("standin-requests.jsonl");
    let standin = Arc::new(Standin {
        spec,
        behaviour,
        vmm: Mutex::default(),
        exit,
        next_port: AtomicU32::new(FIRST_HOST_PORT),
        request_log,
        boot_count: AtomicU32::new(0),
        event_monitor,
    });
    standin.event("vmm", "starting");
    eprintln!("stand-in: API on {}", api_socket.display());
    let code = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let standin = Arc::clone(&standin);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let standin = Arc::clone(&standin);
                        async move { Ok::<_, Infallible>(standin.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            changed = exit_rx.wait_for(Option::is_some) => {
                break changed.map(|c| c.unwrap_or(0)).unwrap_or(0);
            }
        }
    };
    // Let the last reply reach its client.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = std::fs::remove_file(&api_socket);
    eprintln!("stand-in: exiting with {code}");
    code
}

impl Standin {
    fn exit_soon(self: &Arc<Self>, code: i32, after: Duration) {
        let standin = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            standin.exit.send_replace(Some(code));
        });
    }

    /// Appends an event to the event monitor's file as cloud-hypervisor writes it
    /// (`event_monitor.rs`: pretty JSON, then a blank line).
    pub fn event(&self, source: &str, event: &str) {
        let Some(path) = &self.event_monitor else {
            return;
        };
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let event = json!({
            "timestamp": { "secs": since.as_secs(), "nanos": since.subsec_nanos() },
            "source": source,
            "event": event,
            "properties": null,
        });
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let text = serde_json::to_string_pretty(&event).unwrap_or_default();
            let _ = write!(f, "{text}\n\n");
        }
    }

    /// The guest powered off: cloud-hypervisor's exit event ends the process.
    fn guest_power_off(self: &Arc<Self>) {
        eprintln!("stand-in: guest powered off");
        self.event("vm", "shutdown");
        self.event("vmm", "shutdown");
        self.exit_soon(0, Duration::from_millis(100));
    }

    fn log_request(&self, method: &str, path: &str, body: &Option<Value>) {
        let line = json!({"method": method, "path": path, "body": body});
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.request_log)
        {
            let _ = writeln!(f, "{line}");
        }
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Reply {
        let method = req.method().as_str().to_ascii_lowercase();
        let path = req.uri().path().to_owned();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error(400, &["Bad Request"]),
        };
        let Some(endpoint) = path.strip_prefix("/api/v1") else {
            return error(404, &["Not Found"]);
        };
        let op = match self.spec.operation(endpoint, &method) {
            Lookup::NoPath => return error(404, &["Not Found"]),
            Lookup::NoMethod => return error(400, &["Bad Request"]),
            Lookup::Found(op) => op,
        };
        let value = match op.body {
            None => None,
            Some(_) if body.is_empty() && op.body_required => {
                return error(400, &["Bad Request"]);
            }
            Some(_) if body.is_empty() => None,
            Some(schema) => {
                let value: Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return error(400, &["Failed to deserialize JSON", &e.to_string()]),
                };
                let report = self.spec.validate(schema, &value);
                if !report.is_valid() {
                    eprintln!(
                        "stand-in: {endpoint} body violates the spec: {:?}",
                        report.errors
                    );
                    return error(
                        400,
                        &["Failed to deserialize JSON", &report.errors.join("; ")],
                    );
                }
                Some(value)
            }
        };
        self.log_request(&method, endpoint, &value);
        let answer = self.dispatch(endpoint, value);
        if answer.status() == StatusCode::OK
            && let Some(schema) = op.ok_schema
        {
            return self.checked(answer, schema).await;
        }
        answer
    }

    /// A 200 reply whose body does not match the spec is a stand-in bug: say so.
    async fn checked(&self, answer: Reply, schema: &Value) -> Reply {
        let bytes = match answer.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(never) => match never {},
        };
        let report = serde_json::from_slice::<Value>(&bytes)
            .map(|v| self.spec.validate(schema, &v))
            .unwrap_or_else(|e| super::schema::Report {
                errors: vec![e.to_string()],
                unknown: Vec::new(),
            });
        if report.is_valid() {
            reply(200, serde_json::from_slice(&bytes).ok())
        } else {
            error(
                500,
                &[
                    "stand-in bug: reply does not match the spec",
                    &report.errors.join("; "),
                ],
            )
        }
    }

    fn dispatch(self: &Arc<Self>, endpoint: &str, body: Option<Value>) -> Reply {
        let body = body.unwrap_or(Value::Null);
        match endpoint {
            "/vmm.ping" => reply(
                200,
                Some(json!({
                    "build_version": "v0.0.0-vmkit-standin",
                    "version": "0.0.0",
                    "pid": std::process::id(),
                    "features": [],
                })),
            ),
            "/vmm.shutdown" => {
                let mut vmm = lock(&self.vmm);
                vmm.vm = None;
                vmm.config = None;
                self.event("vmm", "shutdown");
                self.exit_soon(0, Duration::from_millis(20));
                reply(200, None)
            }
            "/vm.create" => self.vm_create(body),
            "/vm.boot" => self.vm_boot(),
            "/vm.info" => self.vm_info(),
            "/vm.pause" => self.vm_pause(),
            "/vm.resume" => self.vm_resume(),
            "/vm.power-button" => self.vm_power_button(),
            "/vm.shutdown" => {
                let mut vmm = lock(&self.vmm);
                match vmm.vm.take() {
                    None => api_error(500, "The VM could not shutdown", &["VM is not running"]),
                    Some(_) => {
                        self.event("vm", "shutdown");
                        no_content()
                    }
                }
            }
            "/vm.delete" => {
                let mut vmm = lock(&self.vmm);
                vmm.vm = None;
                vmm.config = None;
                no_content()
            }
            "/vm.resize" => self.vm_resize(&body),
            "/vm.snapshot" => self.vm_snapshot(&body),
            "/vm.restore" => self.vm_restore(&body),
            other => error(
                500,
                &[&format!("{other} is not implemented by the vmkit stand-in")],
            ),
        }
    }

    fn vm_create(&self, body: Value) -> Reply {
        let mut vmm = lock(&self.vmm);
        if vmm.config.is_some() {
            return api_error(
                500,
                "The VM could not be created",
                &["VM is already created"],
            );
        }
        vmm.config = Some(body);
        no_content()
    }

    fn vm_boot(self: &Arc<Self>) -> Reply {
        let mut vmm = lock(&self.vmm);
        if vmm.vm.is_some() {
            return api_error(500, "The VM could not boot", &["VM is already created"]);
        }
        let Some(config) = vmm.config.clone() else {
            return api_error(404, "The VM could not boot", &["VM config is missing"]);
        };
        if let Err(chain) = validate_config(&config) {
            let mut rest = vec!["Failed to validate config"];
            rest.extend(chain.iter().map(String::as_str));
            return api_error(500, "The VM could not boot", &rest);
        }
        if let Err(chain) = check_files(&config) {
            let rest: Vec<&str> = chain.iter().map(String::as_str).collect();
            return api_error(500, "The VM could not boot", &rest);
        }
        let delay = Duration::from_millis(self.behaviour.agent_delay_ms);
        match self.start_vm(&config, RunState::Running, delay, true) {
            Ok(vm) => {
                vmm.vm = Some(vm);
                self.event("vm", "booted");
                no_content()
            }
            Err(chain) => {
                let rest: Vec<&str> = chain.iter().map(String::as_str).collect();
                api_error(500, "The VM could not boot", &rest)
            }
        }
    }

    /// Creates the devices of a VM: the serial file and the hybrid-vsock socket.
    fn start_vm(
        self: &Arc<Self>,
        config: &Value,
        state: RunState,
        agent_delay: Duration,
        fresh_boot: bool,
    ) -> Result<Vm, Vec<String>> {
        if str_at(config, "/serial/mode") == Some("File")
            && let Some(file) = str_at(config, "/serial/file")
        {
            let mut serial = File::create(file)
                .map_err(|e| vec!["Error creating console devices".to_owned(), e.to_string()])?;
            let banner = if fresh_boot {
                format!(
                    "stand-in: booting {} with {:?}\n",
                    str_at(config, "/payload/kernel").unwrap_or("?"),
                    str_at(config, "/payload/cmdline").unwrap_or("")
                )
            } else {
                "stand-in: restored\n".to_owned()
            };
            let _ = serial.write_all(banner.as_bytes());
            let mut left = self.behaviour.console_bytes;
            let line = [b'.'; 63];
            while left > 0 {
                let n = left.min(64);
                let _ = serial.write_all(&line[..usize::try_from(n - 1).unwrap_or(0)]);
                let _ = serial.write_all(b"\n");
                left -= n;
            }
            let _ = serial.write_all(b"stand-in: login prompt\n");
        }
        let socket = str_at(config, "/vsock/socket").map(PathBuf::from);
        let boot_ram = u64_at(config, "/memory/size").unwrap_or(512 * MIB);
        let hotplug = u64_at(config, "/memory/hotplug_size").unwrap_or(0);
        let (gate, gate_rx) = watch::channel(Gate {
            paused: state == RunState::Paused,
            agent_ready_at: Instant::now() + agent_delay,
        });
        let vsock_task = match socket.clone() {
            None => tokio::spawn(async {}),
            Some(path) => {
                let listener = std::os::unix::net::UnixListener::bind(&path)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        UnixListener::from_std(l)
                    })
                    .map_err(|e| {
                        vec![
                            "Error from device manager".to_owned(),
                            format!("Cannot create virtio-vsock device: {}: {e}", path.display()),
                        ]
                    })?;
                let boot = self.boot_count.fetch_add(1, Ordering::SeqCst);
                let boot_id = if fresh_boot {
                    format!("standin-{}-{boot}", std::process::id())
                } else {
                    "standin-restored".to_owned()
                };
                tokio::spawn(vsock_loop(listener, Arc::clone(self), gate_rx, boot_id))
            }
        };
        Ok(Vm {
            state,
            gate,
            vsock_task,
            vsock_path: socket,
            current_ram: boot_ram,
            boot_ram,
            hotplug,
            power_off_pending: false,
        })
    }

    fn vm_info(&self) -> Reply {
        let vmm = lock(&self.vmm);
        let Some(config) = &vmm.config else {
            return api_error(404, "The VM info is not available", &["VM is not created"]);
        };
        let (state, memory) = match &vmm.vm {
            None => (
                "Created",
                u64_at(config, "/memory/size").unwrap_or(512 * MIB),
            ),
            Some(vm) => (
                match vm.state {
                    RunState::Running => "Running",
                    RunState::Paused => "Paused",
                },
                vm.current_ram,
            ),
        };
        reply(
            200,
            Some(json!({"config": config, "state": state, "memory_actual_size": memory})),
        )
    }

    fn vm_pause(&self) -> Reply {
        let mut vmm = lock(&self.vmm);
        let Some(vm) = vmm.vm.as_mut() else {
            return api_error(500, "The VM could not be paused", &["VM is not running"]);
        };
        if vm.state == RunState::Paused {
            return api_error(
                500,
                "The VM could not be paused",
                &[
                    "Cannot pause VM",
                    "Failed to pause migratable component",
                    "Invalid transition: InvalidStateTransition(Paused, Paused)",
                ],
            );
        }
        vm.state = RunState::Paused;
        vm.gate.send_modify(|g| g.paused = true);
        no_content()
    }

    fn vm_resume(self: &Arc<Self>) -> Reply {
        let mut vmm = lock(&self.vmm);
        let Some(vm) = vmm.vm.as_mut() else {
            return api_error(500, "The VM could not resume", &["VM is not running"]);
        };
        if vm.state == RunState::Running {
            return api_error(
                500,
                "The VM could not resume",
                &[
                    "Cannot resume VM",
                    "Failed to resume migratable component",
                    "Invalid transition: InvalidStateTransition(Running, Running)",
                ],
            );
        }
        vm.state = RunState::Running;
        vm.gate.send_modify(|g| g.paused = false);
        if vm.power_off_pending {
            self.guest_power_off();
        }
        no_content()
    }

    fn vm_power_button(self: &Arc<Self>) -> Reply {
        let mut vmm = lock(&self.vmm);
        let Some(vm) = vmm.vm.as_mut() else {
            return api_error(500, "Error triggering power button", &["VM is not running"]);
        };
        if self.behaviour.ignore_power_button {
            eprintln!("stand-in: the guest ignores the power button");
        } else if vm.state == RunState::Paused {
            vm.power_off_pending = true;
        } else {
            self.guest_power_off();
        }
        no_content()
    }

    fn vm_resize(&self, body: &Value) -> Reply {
        const OUTER: &str = "The VM could not be resized";
        let mut vmm = lock(&self.vmm);
        let Vmm { config, vm } = &mut *vmm;
        let Some(config) = config.as_mut() else {
            return api_error(404, OUTER, &["VM is not created"]);
        };
        let desired_vcpus = u64_at(body, "/desired_vcpus");
        let desired_ram = u64_at(body, "/desired_ram");
        if let Some(vcpus) = desired_vcpus
            && vm.is_some()
            && vcpus > u64_at(config, "/cpus/max_vcpus").unwrap_or(1)
        {
            return api_error(
                500,
                OUTER,
                &["Error from CPU manager", "Requested vCPUs exceed maximum"],
            );
        }
        if let (Some(ram), Some(vm)) = (desired_ram, vm.as_mut())
            && ram > vm.current_ram
            && vm.hotplug > 0
        {
            let added = ram - vm.current_ram;
            if added % HOTPLUG_STEP != 0 {
                return api_error(
                    500,
                    OUTER,
                    &[
                        "Memory manager error",
                        "The requested hotplug memory addition is not a valid size",
                    ],
                );
            }
            if ram > vm.boot_ram + vm.hotplug {
                return api_error(
                    500,
                    OUTER,
                    &[
                        "Memory manager error",
                        "Not enough space in the hotplug RAM region",
                    ],
                );
            }
            vm.current_ram = ram;
        }
        // cloud-hypervisor records both in the config whether or not the guest
        // changed (ACPI hotplug neither removes memory nor fails on a shrink).
        if let Some(vcpus) = desired_vcpus {
            config["cpus"]["boot_vcpus"] = json!(vcpus);
        }
        if let Some(ram) = desired_ram {
            config["memory"]["size"] = json!(ram);
        }
        no_content()
    }

    fn vm_snapshot(&self, body: &Value) -> Reply {
        const OUTER: &str = "The VM could not be snapshotted";
        let vmm = lock(&self.vmm);
        // cloud-hypervisor's VmSnapshotConfig has a required destination_url (the
        // spec marks it optional): serde refuses the body without it.
        let Some(url) = str_at(body, "/destination_url") else {
            return error(
                400,
                &[
                    "Failed to deserialize JSON",
                    "missing field `destination_url`",
                ],
            );
        };
        let (Some(vm), Some(config)) = (&vmm.vm, &vmm.config) else {
            return api_error(500, OUTER, &["VM is not running"]);
        };
        if vm.state != RunState::Paused {
            return api_error(
                500,
                OUTER,
                &[
                    "Cannot snapshot VM",
                    "Failed to snapshot migratable component",
                    "Trying to snapshot while VM is running",
                ],
            );
        }
        let send = |detail: String| {
            api_error(
                500,
                OUTER,
                &[
                    "Cannot send VM snapshot",
                    "Failed to send migratable component snapshot",
                    &detail,
                ],
            )
        };
        let dir = match url_to_dir(url) {
            Ok(d) => d,
            Err(detail) => return send(detail),
        };
        let create = |name: &str, data: &[u8]| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(name))
                .and_then(|mut f| f.write_all(data))
        };
        if let Err(e) = create("config.json", config.to_string().as_bytes()) {
            return send(format!("Error creating VM config snapshot file: {e}"));
        }
        let state = json!({"standin": {"memory": vm.current_ram}});
        if let Err(e) = create("state.json", state.to_string().as_bytes()) {
            return send(format!("Error creating VM state snapshot file: {e}"));
        }
        if let Err(e) = create("memory-ranges", b"") {
            return send(format!("Error creating memory ranges file: {e}"));
        }
        no_content()
    }

    fn vm_restore(self: &Arc<Self>, body: &Value) -> Reply {
        const OUTER: &str = "The VM could not be restored";
        let mut vmm = lock(&self.vmm);
        if vmm.vm.is_some() || vmm.config.is_some() {
            return api_error(500, OUTER, &["VM is already created"]);
        }
        let Some(url) = str_at(body, "/source_url") else {
            return error(
                400,
                &["Failed to deserialize JSON", "missing field `source_url`"],
            );
        };
        let receive = |detail: String| {
            api_error(
                500,
                OUTER,
                &[
                    "Cannot restore VM",
                    "Failed to receive migratable component snapshot",
                    &detail,
                ],
            )
        };
        let dir = match url_to_dir(url) {
            Ok(d) => d,
            Err(detail) => return receive(detail),
        };
        let config_path = dir.join("config.json");
        let config: Value = match std::fs::read(&config_path) {
            Err(e) => {
                return receive(format!(
                    "Error opening VM config snapshot file {config_path:?}: {e}"
                ));
            }
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => return receive(format!("Error deserialising VM config snapshot: {e}")),
            },
        };
        let report = self.spec.validate_component("VmConfig", &config);
        if !report.is_valid() {
            return receive(format!(
                "Error deserialising VM config snapshot: {}",
                report.errors.join("; ")
            ));
        }
        if let Err(e) = std::fs::metadata(dir.join("state.json")) {
            return receive(format!("Error opening VM state snapshot file: {e}"));
        }
        let resume = body.get("resume").and_then(Value::as_bool).unwrap_or(false);
        let state = if resume {
            RunState::Running
        } else {
            RunState::Paused
        };
        match self.start_vm(&config, state, Duration::ZERO, false) {
            Ok(vm) => {
                vmm.config = Some(config);
                vmm.vm = Some(vm);
                no_content()
            }
            Err(chain) => {
                let rest: Vec<&str> = chain.iter().map(String::as_str).collect();
                api_error(500, OUTER, &rest)
            }
        }
    }
}

/// cloud-hypervisor's `url_to_path`: `file://` and an existing directory.
fn url_to_dir(url: &str) -> Result<PathBuf, String> {
    let path = url
        .strip_prefix("file://")
        .map(PathBuf::from)
        .ok_or_else(|| format!("Could not extract path from URL: {url}"))?;
    if !path.is_dir() {
        return Err(format!("Destination is not a directory: {path:?}"));
    }
    Ok(path)
}

/// The part of cloud-hypervisor's `VmConfig::validate` that vmkit's configs touch.
fn validate_config(config: &Value) -> Result<(), Vec<String>> {
    let boot = u64_at(config, "/cpus/boot_vcpus").unwrap_or(1);
    let max = u64_at(config, "/cpus/max_vcpus").unwrap_or(boot);
    if max < boot {
        return Err(vec![format!(
            "Max CPUs ({max}) lower than boot CPUs ({boot})"
        )]);
    }
    for device in ["serial", "console"] {
        if str_at(config, &format!("/{device}/mode")) == Some("File")
            && str_at(config, &format!("/{device}/file")).is_none()
        {
            return Err(vec!["Path missing when using file console mode".into()]);
        }
    }
    if str_at(config, "/payload/kernel").is_none() && str_at(config, "/payload/firmware").is_none()
    {
        return Err(vec!["No kernel or firmware in the payload".into()]);
    }
    Ok(())
}

/// The files cloud-hypervisor opens at boot.
fn check_files(config: &Value) -> Result<(), Vec<String>> {
    let open = |path: &str| File::open(path).map(|_| ()).map_err(|e| e.to_string());
    if let Some(kernel) = str_at(config, "/payload/kernel") {
        open(kernel).map_err(|e| vec!["Cannot open kernel file".to_owned(), e])?;
    }
    if let Some(initramfs) = str_at(config, "/payload/initramfs") {
        open(initramfs).map_err(|e| vec!["Cannot open initramfs file".to_owned(), e])?;
    }
    for disk in config
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(path) = str_at(disk, "/path") {
            std::fs::OpenOptions::new()
                .read(true)
                .write(disk.get("readonly").and_then(Value::as_bool) != Some(true))
                .open(path)
                .map_err(|e| {
                    vec![
                        "Error from device manager".to_owned(),
                        format!("Failed to open disk image {path}: {e}"),
                    ]
                })?;
        }
    }
    Ok(())
}

/// The VMM side of hybrid vsock for one VM.
async fn vsock_loop(
    listener: UnixListener,
    standin: Arc<Standin>,
    gate: watch::Receiver<Gate>,
    boot_id: String,
) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        connections.spawn(vsock_connection(
            stream,
            Arc::clone(&standin),
            gate.clone(),
            boot_id.clone(),
        ));
        while connections.try_join_next().is_some() {}
    }
}

async fn vsock_connection(
    mut stream: UnixStream,
    standin: Arc<Standin>,
    mut gate: watch::Receiver<Gate>,
    boot_id: String,
) {
    // `CONNECT <port>\n`, read byte by byte as cloud-hypervisor's muxer does.
    let mut line = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while line.len() < 32 {
            match stream.read_u8().await {
                Ok(b'\n') => return true,
                Ok(b) => line.push(b),
                Err(_) => return false,
            }
        }
        false
    })
    .await;
    if read != Ok(true) {
        return;
    }
    let text = String::from_utf8_lossy(&line);
    let Some(port) = text
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    // A paused guest does not answer until it runs again.
    let Ok(state) = gate.wait_for(|g| !g.paused).await.map(|g| *g) else {
        return;
    };
    // Nothing listens on other ports, nor before the agent has started: the guest
    // answers RST and cloud-hypervisor closes the stream.
    if port != VSOCK_PORT || Instant::now() < state.agent_ready_at {
        return;
    }
    let host_port = standin.next_port.fetch_add(1, Ordering::SeqCst);
    if stream
        .write_all(format!("OK {host_port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let power = Arc::clone(&standin);
    let events = Arc::clone(&standin);
    let agent = Arc::new(StandinAgent {
        boot_id,
        power_off: Arc::new(move || power.guest_power_off()),
        event: Arc::new(move |source, event| events.event(source, event)),
    });
    let _ = serve(stream, agent, ServerConfig::default()).await;
}

/// Ends this process when the test process that started it is gone, so a failed
/// test leaves no stand-in behind.
pub fn watch_parent(pid: u32, start: u64) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(500));
            if super::proc_start(pid) != Some(start) {
                std::process::exit(3);
            }
        }
    });
}
