//! Ansible inventories (INI and YAML) as the host list.

use std::path::Path;

use crate::config::Host;

/// Reads the hosts of `group` (all hosts when None) from an Ansible inventory file.
pub fn load(path: &Path, group: Option<&str>) -> anyhow::Result<Vec<Host>> {
    let _ = group;
    anyhow::bail!(
        "{}: Ansible inventories are not supported yet",
        path.display()
    )
}
