//! `cargo xtask lab up|down`: the netns lab kept up for hands-on use.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use lb_lab::Lab;

/// Namespace-name prefix of the hands-on lab (`cidlb-lab-c`, `cidlb-lab-b`, `cidlb-lab-n1`...).
pub const PREFIX: &str = "cidlb-lab-";

pub fn config_path() -> PathBuf {
    crate::root().join("target/lab/cidlb.yaml")
}

pub fn up(nodes: usize) -> Result<()> {
    if Lab::down(PREFIX) > 0 {
        eprintln!("removed an earlier lab");
    }
    let lab = Lab::up(PREFIX, nodes).map_err(|e| anyhow!("building the lab: {e}"))?;
    let cfg = config_path();
    std::fs::create_dir_all(cfg.parent().expect("has a parent"))?;
    std::fs::write(&cfg, lab.cidlb_config("/sys/fs/bpf/cidlb-lab", ""))?;
    let (c, b) = (lab.client.name.clone(), lab.balancer.name.clone());
    let names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    lab.keep();
    println!(
        "lab up: client {c}, balancer {b}, nodes {}",
        names.join(" ")
    );
    println!("config: {}", cfg.display());
    println!(
        "run the balancer:  nsenter --net=/run/netns/{b} target/release/cidlb run --config {} --ready-file {}",
        cfg.display(),
        cfg.with_file_name("ready").display()
    );
    println!(
        "                   (ready once {} exists)",
        cfg.with_file_name("ready").display()
    );
    println!(
        "stats:             target/release/cidlb stats --pin-dir /sys/fs/bpf/cidlb-lab --watch 1"
    );
    println!("a shell on a host: ip netns exec {c} bash");
    println!("tear down:         cargo xtask lab down");
    Ok(())
}

pub fn down() -> Result<()> {
    let n = Lab::down(PREFIX);
    println!("removed {n} lab namespace(s)");
    Ok(())
}
