//! What vmkit tells cloud-hypervisor: the exact `vm.create` body for every option
//! vmkit uses, checked against the official spec; and the spec validator itself.

#[path = "support/ch_standin/mod.rs"]
mod ch_standin;

use ch_standin::schema::Spec;
use serde_json::{Value, json};
use vmkit_core::{
    DiskConfig, DiskFormat, HypervisorError, MacAddr, MachineConfig, NicConfig, VmId, VmName,
};
use vmkit_hv::{ChConfig, CloudHypervisor};

fn spec() -> Spec {
    Spec::load().expect("the cloud-hypervisor spec")
}

/// A machine with every option vmkit sets.
fn full_machine() -> MachineConfig {
    let mut config = MachineConfig::new(
        VmId::generate(),
        VmName::new("full").expect("name"),
        "/var/lib/vmkit/run/full".into(),
        "/var/lib/vmkit/images/base/vmlinuz".into(),
    );
    config.initramfs = Some("/var/lib/vmkit/images/base/initrd.img".into());
    config.cmdline = "root=/dev/vda rw quiet".into();
    config.disks.push(DiskConfig::new(
        "/var/lib/vmkit/volumes/full-root.raw",
        DiskFormat::Raw,
    ));
    let mut data = DiskConfig::new("/var/lib/vmkit/volumes/full-seed.raw", DiskFormat::Raw);
    data.read_only = true;
    config.disks.push(data);
    config.nic = Some(NicConfig::new(
        "vmk-0a000002",
        MacAddr([0x52, 0x54, 0x00, 0x0a, 0x00, 0x02]),
    ));
    config.vcpus = 2;
    config.max_vcpus = 4;
    config.memory_mib = 1024;
    config
}

fn body(ch: &ChConfig, config: &MachineConfig) -> Value {
    let text = CloudHypervisor::new(ch.clone())
        .vm_create_json(config)
        .expect("vm.create body");
    serde_json::from_str(&text).expect("JSON")
}

#[test]
fn a_full_machine_is_sent_exactly() {
    let sent = body(&ChConfig::new().hotplug_memory_mib(2048), &full_machine());
    assert_eq!(
        sent,
        json!({
            "payload": {
                "kernel": "/var/lib/vmkit/images/base/vmlinuz",
                "initramfs": "/var/lib/vmkit/images/base/initrd.img",
                "cmdline": "root=/dev/vda rw quiet console=ttyS0"
            },
            "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
            "memory": {"size": 1_073_741_824_u64, "hotplug_size": 2_147_483_648_u64},
            "disks": [
                {
                    "path": "/var/lib/vmkit/volumes/full-root.raw",
                    "readonly": false,
                    "image_type": "Raw"
                },
                {
                    "path": "/var/lib/vmkit/volumes/full-seed.raw",
                    "readonly": true,
                    "image_type": "Raw"
                }
            ],
            "net": [{"tap": "vmk-0a000002", "mac": "52:54:00:0a:00:02"}],
            "rng": {"src": "/dev/urandom"},
            "serial": {"mode": "File", "file": "/var/lib/vmkit/run/full/console.log"},
            "console": {"mode": "Off"},
            "vsock": {"cid": 3, "socket": "/var/lib/vmkit/run/full/vsock.sock"},
            "pvpanic": true
        })
    );
}

#[test]
fn a_minimal_machine_leaves_out_what_it_does_not_have() {
    let mut config = MachineConfig::new(
        VmId::generate(),
        VmName::new("mini").expect("name"),
        "/run/vmkit/mini".into(),
        "/img/vmlinuz".into(),
    );
    config
        .disks
        .push(DiskConfig::new("/img/mini.raw", DiskFormat::Raw));
    let sent = body(&ChConfig::new(), &config);
    assert_eq!(
        sent["payload"],
        json!({"kernel": "/img/vmlinuz", "cmdline": "console=ttyS0"}),
        "no initramfs key without an initramfs"
    );
    assert_eq!(sent["cpus"], json!({"boot_vcpus": 1, "max_vcpus": 1}));
    assert_eq!(
        sent["memory"],
        json!({"size": 536_870_912}),
        "no hotplug by default"
    );
    assert!(sent.get("net").is_none(), "no NIC, no net");
    assert_eq!(sent["vsock"]["cid"], 3);
}

#[test]
fn max_vcpus_below_boot_vcpus_is_raised_to_boot_vcpus() {
    let mut config = full_machine();
    config.max_vcpus = 1;
    let sent = body(&ChConfig::new(), &config);
    assert_eq!(sent["cpus"], json!({"boot_vcpus": 2, "max_vcpus": 2}));
}

#[test]
fn relative_paths_are_made_absolute() {
    let mut config = full_machine();
    config.kernel = "images/vmlinuz".into();
    let sent = body(&ChConfig::new(), &config);
    let cwd = std::env::current_dir().expect("cwd");
    assert_eq!(
        sent["payload"]["kernel"],
        cwd.join("images/vmlinuz").to_str().expect("utf-8")
    );
}

#[test]
fn every_disk_states_raw_and_none_asks_for_backing_files() {
    let sent = body(&ChConfig::new(), &full_machine());
    for disk in sent["disks"].as_array().expect("disks") {
        assert_eq!(disk["image_type"], "Raw");
        assert!(disk.get("backing_files").is_none(), "{disk}");
    }
}

#[test]
fn what_vmkit_sends_is_valid_for_the_spec_with_no_undeclared_property() {
    let spec = spec();
    let full = body(&ChConfig::new().hotplug_memory_mib(512), &full_machine());
    let report = spec.validate_component("VmConfig", &full);
    assert!(report.is_strictly_valid(), "{report:?}");

    let create = match spec.operation("/vm.create", "put") {
        ch_standin::schema::Lookup::Found(op) => op,
        other => panic!("the spec has no PUT /vm.create: {other:?}"),
    };
    assert!(create.body_required);
    let schema = create.body.expect("a body schema");
    assert!(spec.validate(schema, &full).is_strictly_valid());
}

/// A confined VMM gets landlock in `vm.create` with its run directory, read-write;
/// cloud-hypervisor adds the config's own paths (kernel, disks, sockets) itself.
#[test]
fn a_confined_machine_enables_landlock_with_its_run_dir_and_stays_valid_for_the_spec() {
    let mut machine = full_machine();
    machine.confinement = Some(vmkit_core::Confinement::new(
        0x5000_0000,
        vmkit_core::CgroupLimits::default(),
    ));
    let sent = body(&ChConfig::new(), &machine);
    assert_eq!(sent["landlock_enable"], true);
    assert_eq!(
        sent["landlock_rules"],
        json!([{"path": "/var/lib/vmkit/run/full", "access": "rw"}])
    );
    let report = spec().validate_component("VmConfig", &sent);
    assert!(report.is_strictly_valid(), "{report:?}");

    let unconfined = body(&ChConfig::new(), &full_machine());
    assert!(unconfined.get("landlock_enable").is_none());
}

#[test]
fn configs_the_backend_cannot_run_are_refused_before_anything_starts() {
    let ch = CloudHypervisor::new(ChConfig::new());
    let mut qcow = full_machine();
    qcow.disks[1].format = DiskFormat::Qcow2;
    let mut no_disk = full_machine();
    no_disk.disks.clear();
    let mut long_tap = full_machine();
    long_tap.nic = Some(NicConfig::new(
        "a-tap-name-too-long",
        MacAddr([2, 0, 0, 0, 0, 1]),
    ));
    for config in [qcow, no_disk, long_tap] {
        assert!(matches!(
            ch.vm_create_json(&config),
            Err(HypervisorError::InvalidConfig(_))
        ));
    }
}

#[test]
fn the_validator_finds_what_cloud_hypervisor_would_refuse() {
    let spec = spec();
    let good = body(&ChConfig::new(), &full_machine());
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        edit(&mut v);
        spec.validate_component("VmConfig", &v)
    };

    let r = broken(&|v| v["payload"]["kernel"] = json!(7));
    assert_eq!(r.errors, ["/payload/kernel: expected a string, got 7"]);
    let r = broken(&|v| {
        v.as_object_mut().expect("object").remove("payload");
    });
    assert_eq!(r.errors, ["/: missing required property \"payload\""]);
    let r = broken(&|v| v["disks"][0]["image_type"] = json!("raw"));
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert!(r.errors[0].starts_with("/disks/0/image_type: \"raw\" is not one of"));
    let r = broken(&|v| v["vsock"]["cid"] = json!(2));
    assert_eq!(r.errors, ["/vsock/cid: 2 is below the minimum 3"]);
    let r = broken(&|v| v["disks"][0]["pci_device_id"] = json!(256));
    assert_eq!(
        r.errors,
        ["/disks/0/pci_device_id: 256 is out of range for uint8"]
    );
    let r = broken(&|v| v["cpus"]["boot_vcpus"] = json!(0));
    assert_eq!(r.errors, ["/cpus/boot_vcpus: 0 is below the minimum 1"]);
    let r = broken(&|v| v["rng"] = json!({}));
    assert_eq!(r.errors, ["/rng: missing required property \"src\""]);
    let r = broken(&|v| v["net"] = json!({"tap": "x"}));
    assert!(r.errors[0].starts_with("/net: expected an array"), "{r:?}");
    let r = broken(&|v| v["memory"]["size"] = json!(null));
    assert_eq!(r.errors, ["/memory/size: null is not allowed"]);

    let r = broken(&|v| v["serial"]["colour"] = json!("blue"));
    assert!(r.is_valid(), "the spec allows undeclared properties: {r:?}");
    assert_eq!(r.unknown, ["/serial/colour"]);
}

#[test]
fn the_validator_refuses_keywords_it_does_not_know() {
    let spec = Spec::from_yaml(
        "openapi: 3.0.1\npaths: {}\ncomponents:\n  schemas:\n    X:\n      oneOf:\n        - type: string\n",
    )
    .expect("parse");
    let r = spec.validate_component("X", &json!("s"));
    assert!(!r.is_valid(), "{r:?}");
}

#[test]
fn the_validator_honours_additional_properties() {
    let spec = Spec::from_yaml(concat!(
        "openapi: 3.0.1\npaths: {}\ncomponents:\n  schemas:\n",
        "    Closed:\n      type: object\n      additionalProperties: false\n",
        "      properties:\n        a:\n          type: integer\n",
        "    Counters:\n      type: object\n      additionalProperties:\n",
        "        type: integer\n        format: int64\n",
    ))
    .expect("parse");
    assert_eq!(
        spec.validate_component("Closed", &json!({"a": 1, "b": 2}))
            .errors,
        ["/: property \"b\" is not allowed"]
    );
    assert_eq!(
        spec.validate_component("Counters", &json!({"x": "y"}))
            .errors,
        ["/x: expected an integer, got \"y\""]
    );
    assert!(
        spec.validate_component("Counters", &json!({"x": 1}))
            .is_strictly_valid()
    );
}

#[test]
fn the_spec_lists_the_calls_vmkit_makes() {
    let spec = spec();
    for (path, method) in [
        ("/vmm.ping", "get"),
        ("/vmm.shutdown", "put"),
        ("/vm.create", "put"),
        ("/vm.boot", "put"),
        ("/vm.info", "get"),
        ("/vm.pause", "put"),
        ("/vm.resume", "put"),
        ("/vm.power-button", "put"),
        ("/vm.shutdown", "put"),
        ("/vm.resize", "put"),
        ("/vm.snapshot", "put"),
        ("/vm.restore", "put"),
    ] {
        assert!(
            matches!(
                spec.operation(path, method),
                ch_standin::schema::Lookup::Found(_)
            ),
            "{method} {path}"
        );
    }
}
