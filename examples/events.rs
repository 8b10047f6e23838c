//! Run with: `cargo run -p vmkit-examples --example events -- --images DIR` (as root;
//! DIR holds a `tiny` image built by `vmkit image build tiny`, default: the images of
//! vmkit's data directory; `VMKIT_IMAGES=DIR` works too).
//!
//! An event consumer: it follows every VM event the manager records, in order, with
//! no gaps and no duplicates, even though it starts late. The manager stores each
//! event (numbered by `seq`) before it broadcasts it, so a follower:
//!
//! 1. subscribes to the live broadcast first, so nothing can fall between the two;
//! 2. catches up on the stored events after its cursor;
//! 3. takes live events, skipping those it has seen, and goes back to the store when
//!    it finds a gap or lagged behind the broadcast.
//!
//! The same loop serves a consumer that restarts: keep the cursor somewhere durable
//! and pass it in. `Manager::follow_events` packages this loop as an `EventFeed`
//! (the daemon's `GET /v1/events?follow=true` uses it); it is written out here to
//! show how it works. Here one VM is created *before* the consumer starts, then stopped,
//! started and deleted while it follows; the example checks that the consumer saw the
//! whole history of that VM exactly once, in order.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use vmkit_core::{
    CreateRequest, DeleteOptions, Event, EventKind, Manager, UserId, VmName, VmSpec, VmState,
};
use vmkit_examples::{IMAGE, run_on_default_backends};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logging, the image, a scratch data directory, a manager on the default
    // backends, and every VM removed at the end, whatever happens (see lib.rs).
    run_on_default_backends(env!("CARGO_CRATE_NAME"), run).await
}

async fn run(manager: Manager) -> anyhow::Result<()> {
    let name = VmName::new("events-demo")?;
    let spec = VmSpec::new(IMAGE).memory_mib(256);
    manager
        .create(CreateRequest::new(UserId::LOCAL, spec).name(name.clone()))
        .await?;
    println!("created {name}; the consumer starts only now");

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let consumer = tokio::spawn(follow(manager.clone(), 0, seen_tx));

    manager.stop(&name).await?;
    manager.start(&name).await?;
    manager.delete(&name, DeleteOptions::default()).await?;

    // Wait until the consumer has seen the delete, then check what it saw.
    let mut history = Vec::new();
    let wait = async {
        while let Some(event) = seen.recv().await {
            let done = event.kind == EventKind::Deleted && event.vm_name.as_ref() == Some(&name);
            history.push(event);
            if done {
                return Ok(());
            }
        }
        bail!("the consumer stopped before the delete")
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .context("the consumer did not see the delete within 30 s")??;
    consumer.abort();
    check(&history, &name)?;
    println!(
        "the consumer saw all {} events, in order, once each",
        history.len()
    );
    Ok(())
}

/// Follows the manager's events after `cursor`, printing each and passing it on.
async fn follow(
    manager: Manager,
    mut cursor: u64,
    seen: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    // 1. Subscribe before reading the store: an event stored meanwhile is then in
    //    one of the two (or both, and skipped the second time).
    let mut live = manager.subscribe();
    loop {
        // 2. Catch up on what was stored after the cursor.
        loop {
            let stored = manager.events(cursor, 256).await?;
            let Some(last) = stored.last() else { break };
            cursor = last.seq;
            for event in stored {
                deliver(&seen, event)?;
            }
        }
        // 3. Follow live events until one is missing.
        loop {
            match live.recv().await {
                Ok(event) if event.seq <= cursor => continue,
                Ok(event) if event.seq == cursor + 1 => {
                    cursor = event.seq;
                    deliver(&seen, event)?;
                }
                // A gap (events are broadcast in the order they were stored, but two
                // VMs' events may cross) or a slow consumer: back to the store.
                Ok(_) | Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }
}

fn deliver(seen: &mpsc::UnboundedSender<Event>, event: Event) -> anyhow::Result<()> {
    let vm = event.vm_name.as_ref().map_or("-", VmName::as_str);
    println!("#{:<3} {:<12} {}", event.seq, vm, describe(&event.kind));
    seen.send(event).context("nobody reads the events any more")
}

fn describe(kind: &EventKind) -> String {
    match kind {
        EventKind::StateChanged { from, to } => format!("{from} -> {to}"),
        EventKind::CreateFailed { error } => format!("create failed: {error}"),
        EventKind::OperationFailed { operation, error } => format!("{operation} failed: {error}"),
        other => format!("{other:?}"),
    }
}

/// The checks that make this example a test.
fn check(history: &[Event], name: &VmName) -> anyhow::Result<()> {
    ensure!(
        history.windows(2).all(|w| w[0].seq < w[1].seq),
        "events arrived out of order or twice: {:?}",
        history.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    ensure!(
        history.first().map(|e| e.seq) == Some(1),
        "the catch-up missed the first event"
    );
    let change = |from, to| EventKind::StateChanged { from, to };
    use VmState::*;
    let expected = [
        EventKind::Creating,
        change(Creating, Running),
        change(Running, Stopping),
        change(Stopping, Stopped),
        change(Stopped, Starting),
        change(Starting, Running),
        change(Running, Deleting),
        EventKind::Deleted,
    ];
    let of_vm: Vec<&EventKind> = history
        .iter()
        .filter(|e| e.vm_name.as_ref() == Some(name))
        .map(|e| &e.kind)
        .collect();
    ensure!(
        of_vm == expected.iter().collect::<Vec<_>>(),
        "the consumer saw {of_vm:?}, expected {expected:?}"
    );
    Ok(())
}
