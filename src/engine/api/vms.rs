//! `/vms` and below: minimal VMs (a name, the `Default` cluster, the
//! `Blank` template), their disk attachments, backups and checkpoints.

use super::{Reply, Writer, created, disk_xml_as, not_allowed, read_body, xml_reply};
use crate::engine::State;
use crate::engine::backup;
use crate::engine::error::{Error, Result};
use crate::engine::model::{Backup, Checkpoint, Vm, new_id};
use crate::engine::xml::{self, BackupIn, DiskAttachmentIn, VmIn};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use std::sync::Arc;

/// The one cluster.
const CLUSTER_ID: &str = "c1a50000-0000-4000-8000-0000000c1a50";
const CLUSTER_NAME: &str = "Default";
/// The template every oVirt has, with its well-known id.
const BLANK_ID: &str = "00000000-0000-0000-0000-000000000000";
const BLANK_NAME: &str = "Blank";

/// Serve `METHOD /vms/REST...`.
pub async fn route(
    state: &Arc<State>,
    method: &Method,
    rest: &[&str],
    req: Request<Incoming>,
    path: &str,
) -> Result<Reply> {
    match (method, rest) {
        (&Method::GET, []) => {
            let mut w = Writer::new();
            w.open("vms", &[]);
            for vm in state.db.vms()? {
                vm_xml(&mut w, state, &vm);
            }
            w.close("vms");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::POST, []) => {
            let body = read_body(req).await?;
            let vm = add_vm(state, xml::parse(&body, "vm")?)?;
            let mut w = Writer::new();
            vm_xml(&mut w, state, &vm);
            Ok(created(
                &format!("{}/vms/{}", state.base, vm.id),
                w.finish(),
            ))
        }
        (&Method::GET, [id]) => {
            let vm = find_vm(state, id)?;
            let mut w = Writer::new();
            vm_xml(&mut w, state, &vm);
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::GET, [id, "diskattachments"]) => {
            let vm = find_vm(state, id)?;
            let mut w = Writer::new();
            w.open("disk_attachments", &[]);
            for d in state.db.vm_disks(&vm.id)? {
                attachment_xml(&mut w, state, &vm.id, &d.id);
            }
            w.close("disk_attachments");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::GET, [id, "diskattachments", disk]) => {
            let vm = find_vm(state, id)?;
            if !state.db.vm_disks(&vm.id)?.iter().any(|d| d.id == *disk) {
                return Err(Error::NotFound(format!("Entity not found: {disk}")));
            }
            let mut w = Writer::new();
            attachment_xml(&mut w, state, &vm.id, disk);
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::POST, [id, "diskattachments"]) => {
            let vm = find_vm(state, id)?;
            let body = read_body(req).await?;
            let att: DiskAttachmentIn = xml::parse(&body, "disk_attachment")?;
            let disk_id = att.disk.and_then(|d| d.id).ok_or_else(|| {
                Error::BadRequest(
                    "Cannot attach Virtual Disk: the disk id is missing (creating a disk \
                     inside the attachment is not supported; add it with POST /disks)"
                        .into(),
                )
            })?;
            let disk = state.db.attach_disk(&vm.id, &disk_id)?;
            tracing::info!(vm = %vm.id, disk = %disk.id, "disk attached");
            let mut w = Writer::new();
            attachment_xml(&mut w, state, &vm.id, &disk.id);
            Ok(created(
                &format!("{}/vms/{}/diskattachments/{}", state.base, vm.id, disk.id),
                w.finish(),
            ))
        }
        (&Method::GET, [id, "backups"]) => {
            let vm = find_vm(state, id)?;
            let mut w = Writer::new();
            w.open("backups", &[]);
            for b in state.db.backups(Some(&vm.id))? {
                backup_xml(&mut w, state, &b);
            }
            w.close("backups");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::POST, [id, "backups"]) => {
            let body = read_body(req).await?;
            let b = backup::add(state, id, xml::parse::<BackupIn>(&body, "backup")?).await?;
            let mut w = Writer::new();
            backup_xml(&mut w, state, &b);
            Ok(created(
                &format!("{}/vms/{}/backups/{}", state.base, b.vm_id, b.id),
                w.finish(),
            ))
        }
        (&Method::GET, [id, "backups", bid]) => {
            let b = backup::find(state, id, bid)?;
            let mut w = Writer::new();
            backup_xml(&mut w, state, &b);
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::GET, [id, "backups", bid, "disks"]) => {
            let b = backup::find(state, id, bid)?;
            let mut w = Writer::new();
            w.open("disks", &[]);
            for disk_id in &b.disks {
                if let Some(d) = state.db.disk(disk_id)? {
                    let mode = backup::disk_mode(state, &b, &d)?;
                    disk_xml_as(&mut w, state, &d, Some(mode));
                }
            }
            w.close("disks");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::POST, [id, "backups", bid, "finalize"]) => {
            let body = read_body(req).await?;
            if !body.trim().is_empty() {
                xml::parse::<serde::de::IgnoredAny>(&body, "action")?;
            }
            backup::finalize(state, id, bid)?;
            Ok(xml_reply(StatusCode::OK, xml::action_complete()))
        }
        (&Method::GET, [id, "checkpoints"]) => {
            let vm = find_vm(state, id)?;
            let mut w = Writer::new();
            w.open("checkpoints", &[]);
            for c in state.db.checkpoints(&vm.id)? {
                checkpoint_xml(&mut w, state, &c);
            }
            w.close("checkpoints");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::GET, [id, "checkpoints", cid]) => {
            let c = state
                .db
                .checkpoint(cid)?
                .filter(|c| c.vm_id == *id)
                .ok_or_else(|| Error::NotFound(format!("Entity not found: {cid}")))?;
            let mut w = Writer::new();
            checkpoint_xml(&mut w, state, &c);
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::DELETE, [id, "checkpoints", cid]) => {
            backup::remove_checkpoint(state, id, cid).await?;
            Ok(xml_reply(StatusCode::OK, xml::action_complete()))
        }
        _ => Err(not_allowed(method, path)),
    }
}

fn find_vm(state: &State, id: &str) -> Result<Vm> {
    state
        .db
        .vm(id)?
        .ok_or_else(|| Error::NotFound(format!("Entity not found: {id}")))
}

fn add_vm(state: &State, req: VmIn) -> Result<Vm> {
    let name = req.name.unwrap_or_default();
    if name.is_empty() || name.len() > 255 {
        return Err(Error::BadRequest(
            "Cannot add VM: the name must have 1 to 255 characters".into(),
        ));
    }
    let cluster = req.cluster.ok_or_else(|| {
        Error::BadRequest("Cannot add VM: the cluster is required (Default)".into())
    })?;
    let cluster_ok = cluster.id.as_deref().is_none_or(|id| id == CLUSTER_ID)
        && cluster.name.as_deref().is_none_or(|n| n == CLUSTER_NAME)
        && (cluster.id.is_some() || cluster.name.is_some());
    if !cluster_ok {
        let what = cluster.id.or(cluster.name).unwrap_or_default();
        return Err(Error::NotFound(format!("Entity not found: cluster {what}")));
    }
    if let Some(t) = req.template {
        let ok = t.id.as_deref().is_none_or(|id| id == BLANK_ID)
            && t.name.as_deref().is_none_or(|n| n == BLANK_NAME);
        if !ok {
            let what = t.id.or(t.name).unwrap_or_default();
            return Err(Error::NotFound(format!(
                "Entity not found: template {what}"
            )));
        }
    }
    let description = req.description.unwrap_or_default();
    if description.len() > 4096 {
        return Err(Error::BadRequest(
            "The VM description is longer than 4096 characters".into(),
        ));
    }
    let vm = Vm {
        id: new_id(),
        name,
        description,
    };
    state.db.insert_vm(&vm)?;
    tracing::info!(vm = %vm.id, name = %vm.name, "VM added");
    Ok(vm)
}

fn link(w: &mut Writer, href: &str, rel: &str) {
    w.empty("link", &[("href", href), ("rel", rel)]);
}

fn vm_xml(w: &mut Writer, state: &State, vm: &Vm) {
    let href = format!("{}/vms/{}", state.base, vm.id);
    w.open("vm", &[("href", &href), ("id", &vm.id)]);
    for rel in ["backups", "checkpoints", "diskattachments"] {
        link(w, &format!("{href}/{rel}"), rel);
    }
    w.text_element("description", &vm.description);
    w.text_element("name", &vm.name);
    w.text_element("status", "down");
    w.empty(
        "cluster",
        &[
            ("href", &format!("{}/clusters/{CLUSTER_ID}", state.base)),
            ("id", CLUSTER_ID),
        ],
    );
    w.empty(
        "template",
        &[
            ("href", &format!("{}/templates/{BLANK_ID}", state.base)),
            ("id", BLANK_ID),
        ],
    );
    w.close("vm");
}

fn attachment_xml(w: &mut Writer, state: &State, vm_id: &str, disk_id: &str) {
    let href = format!("{}/vms/{vm_id}/diskattachments/{disk_id}", state.base);
    w.open("disk_attachment", &[("href", &href), ("id", disk_id)]);
    w.value("active", true);
    w.value("bootable", false);
    w.text_element("interface", "virtio_scsi");
    w.value("pass_discard", false);
    w.value("read_only", false);
    w.empty(
        "disk",
        &[
            ("href", &format!("{}/disks/{disk_id}", state.base)),
            ("id", disk_id),
        ],
    );
    w.empty(
        "vm",
        &[
            ("href", &format!("{}/vms/{vm_id}", state.base)),
            ("id", vm_id),
        ],
    );
    w.close("disk_attachment");
}

fn backup_xml(w: &mut Writer, state: &State, b: &Backup) {
    let href = format!("{}/vms/{}/backups/{}", state.base, b.vm_id, b.id);
    w.open("backup", &[("href", &href), ("id", &b.id)]);
    w.open("actions", &[]);
    link(w, &format!("{href}/finalize"), "finalize");
    w.close("actions");
    link(w, &format!("{href}/disks"), "disks");
    w.text_element("creation_date", &xml::date(b.created));
    w.text_element("description", &b.description);
    if let Some(from) = &b.from_checkpoint_id {
        w.text_element("from_checkpoint_id", from);
    }
    w.text_element("modification_date", &xml::date(b.updated));
    w.text_element("phase", b.phase.as_str());
    if let Some(to) = &b.to_checkpoint_id {
        w.text_element("to_checkpoint_id", to);
    }
    w.empty(
        "vm",
        &[
            ("href", &format!("{}/vms/{}", state.base, b.vm_id)),
            ("id", &b.vm_id),
        ],
    );
    w.close("backup");
}

fn checkpoint_xml(w: &mut Writer, state: &State, c: &Checkpoint) {
    let href = format!("{}/vms/{}/checkpoints/{}", state.base, c.vm_id, c.id);
    w.open("checkpoint", &[("href", &href), ("id", &c.id)]);
    w.text_element("creation_date", &xml::date(c.created));
    w.text_element("description", &c.description);
    if let Some(p) = &c.parent_id {
        w.text_element("parent_id", p);
    }
    w.text_element("state", "created");
    w.open("disks", &[]);
    for d in &c.disks {
        w.empty(
            "disk",
            &[("href", &format!("{}/disks/{d}", state.base)), ("id", d)],
        );
    }
    w.close("disks");
    w.empty(
        "vm",
        &[
            ("href", &format!("{}/vms/{}", state.base, c.vm_id)),
            ("id", &c.vm_id),
        ],
    );
    w.close("checkpoint");
}
