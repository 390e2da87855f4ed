//! Routing, authentication and the XML of each resource.

use super::State;
use super::error::{Error, Result};
use super::model::{
    Disk, DiskBackup, DiskBackupMode, DiskStatus, Format, Host, Phase, Transfer, new_id, now,
    parse_field,
};
use super::transfer::{self, Action};
use super::xml::{self, DiskIn, ImageTransferIn, Writer};
use super::{disk::MAX_DISK_SIZE, sso};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use std::sync::Arc;
use tracing::Instrument;

mod search;
mod vms;

/// Largest request body we read.
const MAX_BODY: usize = 1024 * 1024;
/// How long a client may take to send a request body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The one storage domain.
const DOMAIN_ID: &str = "d47a0000-0000-4000-8000-00000000da7a";
const DOMAIN_NAME: &str = "data";

type Reply = Response<Full<Bytes>>;

/// Serve one request; errors become faults here.
pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Reply {
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path());
    async move {
        let reply = match route(&state, req).await {
            Ok(r) => r,
            Err(e) => e.to_response(),
        };
        tracing::debug!(status = %reply.status(), "reply");
        reply
    }
    .instrument(span)
    .await
}

async fn read_body(req: Request<Incoming>) -> Result<String> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(Error::TooLarge(MAX_BODY));
    }
    let collected = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| Error::BadRequest("The request body did not arrive in time".into()))?;
    let bytes = collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Error::TooLarge(MAX_BODY)
            } else {
                Error::BadRequest(format!("Cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::BadRequest("The request body is not UTF-8".into()))
}

fn xml_reply(status: StatusCode, body: String) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, xml::CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn created(location: &str, body: String) -> Reply {
    let mut r = xml_reply(StatusCode::CREATED, body);
    if let Ok(v) = header::HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn not_allowed(method: &Method, path: &str) -> Error {
    Error::MethodNotAllowed(format!("Method {method} is not allowed on {path}"))
}

fn authorize(state: &State, req: &Request<Incoming>) -> Result<()> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match token {
        Some(t) if !t.is_empty() && state.db.token_valid(t, now())? => Ok(()),
        Some(_) => Err(Error::Unauthorized(
            "The token is not valid or has expired".into(),
        )),
        None => Err(Error::Unauthorized("Authentication is required".into())),
    }
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> Result<Reply> {
    // The SDK turns a base URL ending in '/' into '//imagetransfers':
    // empty segments are ignored.
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    match segments.as_slice() {
        ["ovirt-engine", "sso", "oauth", "token"] => {
            if method != Method::POST {
                return Err(not_allowed(&method, &path));
            }
            let body = read_body(req).await?;
            return sso::token(state, &body);
        }
        ["ovirt-engine", "services", "sso-logout"] => {
            if method != Method::POST {
                return Err(not_allowed(&method, &path));
            }
            let body = read_body(req).await?;
            return sso::logout(state, &body);
        }
        ["ovirt-engine", "api", ..] => {}
        _ => return Err(Error::NotFound(format!("No resource at {path}"))),
    }
    authorize(state, &req)?;
    let rest: Vec<String> = segments.iter().skip(2).map(|s| s.to_string()).collect();
    let query = req.uri().query().unwrap_or("").to_string();
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    match (&method, rest.as_slice()) {
        (&Method::GET, []) => Ok(xml_reply(StatusCode::OK, api_root(state))),
        (&Method::GET, ["disks"]) => {
            let query = search::DiskQuery::parse(&query)?;
            let mut w = Writer::new();
            w.open("disks", &[]);
            for d in query.select(state.db.disks()?) {
                disk_xml(&mut w, state, &d);
            }
            w.close("disks");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::POST, ["disks"]) => {
            let body = read_body(req).await?;
            let disk = add_disk(state, xml::parse(&body, "disk")?)?;
            let mut w = Writer::new();
            disk_xml(&mut w, state, &disk);
            Ok(created(
                &format!("{}/disks/{}", state.base, disk.id),
                w.finish(),
            ))
        }
        (&Method::GET, ["disks", id]) => {
            let disk = find_disk(state, id)?;
            let mut w = Writer::new();
            disk_xml(&mut w, state, &disk);
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::DELETE, ["disks", id]) => {
            if !state.db.delete_disk_if_free(id)? {
                return Err(Error::Conflict(format!(
                    "Cannot remove Virtual Disk: Disk {id} is locked. Please try again in a few minutes."
                )));
            }
            state.images.remove(id)?;
            tracing::info!(disk = %id, "disk removed");
            Ok(xml_reply(StatusCode::OK, xml::action_complete()))
        }
        (&Method::GET, ["storagedomains"]) => {
            let mut w = Writer::new();
            w.open("storage_domains", &[]);
            domain_xml(&mut w, state);
            w.close("storage_domains");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::GET, ["storagedomains", id]) if *id == DOMAIN_ID => {
            let mut w = Writer::new();
            domain_xml(&mut w, state);
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::GET, ["hosts"]) => {
            let mut w = Writer::new();
            w.open("hosts", &[]);
            for h in &state.hosts {
                host_xml(&mut w, state, h);
            }
            w.close("hosts");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::GET, ["hosts", id]) => {
            let host = find_host(state, id)?;
            let mut w = Writer::new();
            host_xml(&mut w, state, host);
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::GET, ["imagetransfers"]) => {
            let follow = Follow::parse(&query)?;
            let mut w = Writer::new();
            w.open("image_transfers", &[]);
            for t in state.db.transfers()? {
                transfer_xml(&mut w, state, &t, &follow)?;
            }
            w.close("image_transfers");
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::POST, ["imagetransfers"]) => {
            let body = read_body(req).await?;
            let t = transfer::add(
                state,
                xml::parse::<ImageTransferIn>(&body, "image_transfer")?,
            )?;
            let mut w = Writer::new();
            transfer_xml(&mut w, state, &t, &Follow::default())?;
            Ok(created(
                &format!("{}/imagetransfers/{}", state.base, t.id),
                w.finish(),
            ))
        }
        (&Method::GET, ["imagetransfers", id]) => {
            let follow = Follow::parse(&query)?;
            let t = state
                .db
                .transfer(id)?
                .ok_or_else(|| Error::NotFound(format!("Entity not found: {id}")))?;
            let mut w = Writer::new();
            transfer_xml(&mut w, state, &t, &follow)?;
            Ok(xml_reply(StatusCode::OK, w.finish()))
        }
        (&Method::POST, ["imagetransfers", id, action]) => {
            let action = Action::parse(action).ok_or_else(|| {
                Error::NotFound(format!("No action '{action}' on image transfers"))
            })?;
            let body = read_body(req).await?;
            if !body.trim().is_empty() {
                xml::parse::<serde::de::IgnoredAny>(&body, "action")?;
            }
            transfer::act(state, id, action).await?;
            Ok(xml_reply(StatusCode::OK, xml::action_complete()))
        }
        (_, ["vms", vm_rest @ ..]) => vms::route(state, &method, vm_rest, req, &path).await,
        (_, ["disks" | "storagedomains" | "hosts" | "imagetransfers", ..]) | (_, []) => {
            Err(not_allowed(&method, &path))
        }
        _ => Err(Error::NotFound(format!("No resource at {path}"))),
    }
}

fn api_root(state: &State) -> String {
    let mut w = Writer::new();
    w.open("api", &[]);
    w.empty(
        "link",
        &[("href", &format!("{}/disks", state.base)), ("rel", "disks")],
    );
    w.empty(
        "link",
        &[("href", &format!("{}/hosts", state.base)), ("rel", "hosts")],
    );
    w.empty(
        "link",
        &[
            ("href", &format!("{}/imagetransfers", state.base)),
            ("rel", "imagetransfers"),
        ],
    );
    w.empty(
        "link",
        &[
            ("href", &format!("{}/storagedomains", state.base)),
            ("rel", "storagedomains"),
        ],
    );
    w.empty(
        "link",
        &[("href", &format!("{}/vms", state.base)), ("rel", "vms")],
    );
    w.open("product_info", &[]);
    w.text_element("name", "nbdbridge engine");
    w.text_element("vendor", "nbdbridge");
    w.open("version", &[]);
    w.value("build", 0);
    w.text_element("full_version", env!("CARGO_PKG_VERSION"));
    w.value("major", 4);
    w.value("minor", 6);
    w.value("revision", 0);
    w.close("version");
    w.close("product_info");
    w.close("api");
    w.finish()
}

fn find_disk(state: &State, id: &str) -> Result<Disk> {
    state
        .db
        .disk(id)?
        .ok_or_else(|| Error::NotFound(format!("Entity not found: {id}")))
}

fn find_host<'a>(state: &'a State, id: &str) -> Result<&'a Host> {
    state
        .hosts
        .iter()
        .find(|h| h.id == id)
        .ok_or_else(|| Error::NotFound(format!("Entity not found: {id}")))
}

fn add_disk(state: &State, req: DiskIn) -> Result<Disk> {
    let format = match req.format.as_deref() {
        Some(v) => parse_field("format", v, Format::parse)?,
        None => {
            return Err(Error::BadRequest(
                "Cannot add Virtual Disk: the format is required (raw or cow)".into(),
            ));
        }
    };
    let size = req.provisioned_size.as_deref().ok_or_else(|| {
        Error::BadRequest("Cannot add Virtual Disk: provisioned_size is required".into())
    })?;
    let provisioned_size = size
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0 && *n <= MAX_DISK_SIZE)
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "Invalid value '{size}' for 'provisioned_size': expecting 1..{MAX_DISK_SIZE}"
            ))
        })?;
    if let Some(sds) = &req.storage_domains {
        for sd in &sds.storage_domain {
            let ok = sd.id.as_deref().is_none_or(|id| id == DOMAIN_ID)
                && sd.name.as_deref().is_none_or(|n| n == DOMAIN_NAME);
            if !ok {
                let what = sd
                    .id
                    .clone()
                    .or_else(|| sd.name.clone())
                    .unwrap_or_default();
                return Err(Error::NotFound(format!(
                    "Entity not found: storage domain {what}"
                )));
            }
        }
    }
    let backup = match req.backup.as_deref() {
        None => DiskBackup::None,
        Some(v) => parse_field("backup", v, DiskBackup::parse)?,
    };
    if backup == DiskBackup::Incremental && format != Format::Cow {
        return Err(Error::BadRequest(
            "Cannot add Virtual Disk: incremental backup needs a disk in cow (QCOW2) format".into(),
        ));
    }
    let name = req.name.or(req.alias).unwrap_or_default();
    if name.len() > 255 {
        return Err(Error::BadRequest(
            "The disk name is longer than 255 characters".into(),
        ));
    }
    let description = req.description.unwrap_or_default();
    if description.len() > 4096 {
        return Err(Error::BadRequest(
            "The disk description is longer than 4096 characters".into(),
        ));
    }
    let id = match req.id.as_deref() {
        None => new_id(),
        Some(v) => {
            let id = uuid::Uuid::parse_str(v)
                .map_err(|_| {
                    Error::BadRequest(format!("Invalid value '{v}' for 'id': expecting a UUID"))
                })?
                .hyphenated()
                .to_string();
            if state.db.disk(&id)?.is_some() {
                return Err(Error::Conflict(format!(
                    "Cannot add Virtual Disk: a disk with id {id} exists"
                )));
            }
            id
        }
    };
    let disk = Disk {
        id,
        name,
        description,
        format,
        provisioned_size,
        status: DiskStatus::Ok,
        backup,
    };
    state.images.create(&disk)?;
    if let Err(e) = state.db.insert_disk(&disk) {
        let _ = state.images.remove(&disk.id);
        return Err(e);
    }
    tracing::info!(disk = %disk.id, %format, size = provisioned_size, "disk added");
    Ok(disk)
}

fn disk_xml(w: &mut Writer, state: &State, d: &Disk) {
    disk_xml_as(w, state, d, None);
}

/// A disk; in a backup's disk list, with how the backup takes it.
fn disk_xml_as(w: &mut Writer, state: &State, d: &Disk, mode: Option<DiskBackupMode>) {
    let href = format!("{}/disks/{}", state.base, d.id);
    let (actual, apparent) = state.images.sizes(&d.id);
    w.open("disk", &[("href", &href), ("id", &d.id)]);
    w.value("actual_size", actual);
    w.text_element("alias", &d.name);
    w.text_element("backup", d.backup.as_str());
    if let Some(mode) = mode {
        w.text_element("backup_mode", mode.as_str());
    }
    w.text_element("content_type", "data");
    w.text_element("description", &d.description);
    w.text_element("format", d.format.as_str());
    w.text_element("name", &d.name);
    w.value("provisioned_size", d.provisioned_size);
    w.value("sparse", true);
    w.text_element("status", d.status.as_str());
    w.text_element("storage_type", "image");
    w.value("total_size", apparent);
    w.open("storage_domains", &[]);
    w.empty(
        "storage_domain",
        &[
            (
                "href",
                &format!("{}/storagedomains/{DOMAIN_ID}", state.base),
            ),
            ("id", DOMAIN_ID),
        ],
    );
    w.close("storage_domains");
    w.close("disk");
}

fn domain_xml(w: &mut Writer, state: &State) {
    let href = format!("{}/storagedomains/{DOMAIN_ID}", state.base);
    let (available, used) = fs_space(&state.images.path(""));
    w.open("storage_domain", &[("href", &href), ("id", DOMAIN_ID)]);
    w.value("available", available);
    w.value("committed", 0);
    w.text_element("external_status", "ok");
    w.value("master", true);
    w.text_element("name", DOMAIN_NAME);
    w.text_element("status", "active");
    w.text_element("storage_format", "v5");
    w.text_element("type", "data");
    w.value("used", used);
    w.open("storage", &[]);
    w.text_element("type", "localfs");
    w.close("storage");
    w.close("storage_domain");
}

/// Free and used bytes of the file system holding `path`.
#[allow(clippy::unnecessary_cast)] // the libc field types differ by platform
fn fs_space(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is writable
    // memory of the right type; statvfs fills it on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return (0, 0);
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize as u64;
    let free = st.f_bavail as u64 * frsize;
    let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * frsize;
    (free, used)
}

fn host_xml(w: &mut Writer, state: &State, h: &Host) {
    let href = format!("{}/hosts/{}", state.base, h.id);
    let address = h
        .data_url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ':']).next())
        .unwrap_or("");
    w.open("host", &[("href", &href), ("id", &h.id)]);
    w.text_element("address", address);
    w.text_element("name", &h.name);
    w.text_element("status", state.host_status.get(&h.id).as_str());
    w.close("host");
}

/// The links a `follow` query asks to inline.
#[derive(Debug, Default)]
struct Follow {
    disk: bool,
    host: bool,
}

impl Follow {
    fn parse(query: &str) -> Result<Follow> {
        let mut f = Follow::default();
        for (k, v) in sso::parse_form(query) {
            if k != "follow" {
                continue;
            }
            for link in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                // Names match ignoring case and underscores; deeper levels
                // (disk.storage_domains) inline the first level only.
                let first = link.split('.').next().unwrap_or("");
                let norm: String = first
                    .chars()
                    .filter(|c| *c != '_')
                    .flat_map(char::to_lowercase)
                    .collect();
                match norm.as_str() {
                    "disk" | "image" => f.disk = true,
                    "host" => f.host = true,
                    _ => {
                        return Err(Error::BadRequest(format!(
                            "Cannot follow link '{link}': image transfers link to disk and host"
                        )));
                    }
                }
            }
        }
        Ok(f)
    }
}

fn transfer_xml(w: &mut Writer, state: &State, t: &Transfer, follow: &Follow) -> Result<()> {
    let href = format!("{}/imagetransfers/{}", state.base, t.id);
    w.open("image_transfer", &[("href", &href), ("id", &t.id)]);
    w.open("actions", &[]);
    for action in ["cancel", "extend", "finalize", "pause", "resume"] {
        w.empty(
            "link",
            &[("href", &format!("{href}/{action}")), ("rel", action)],
        );
    }
    w.close("actions");
    w.value("active", t.active && t.phase == Phase::Transferring);
    w.text_element("direction", t.direction.as_str());
    w.text_element("format", t.format.as_str());
    w.value("inactivity_timeout", t.inactivity_timeout);
    w.text_element("phase", t.phase.as_str());
    let host = state.hosts.iter().find(|h| h.id == t.host_id);
    if t.ticket_installed {
        if let Some(h) = host {
            let url = h.transfer_url(&t.ticket_id);
            w.text_element("proxy_url", &url);
            w.value("shallow", t.shallow);
            w.text_element("timeout_policy", t.timeout_policy.as_str());
            w.text_element("transfer_url", &url);
        }
    } else {
        w.value("shallow", t.shallow);
        w.text_element("timeout_policy", t.timeout_policy.as_str());
    }
    w.value("transferred", t.transferred);
    let disk_href = format!("{}/disks/{}", state.base, t.disk_id);
    match (follow.disk, state.db.disk(&t.disk_id)?) {
        (true, Some(d)) => disk_xml(w, state, &d),
        _ => w.empty("disk", &[("href", &disk_href), ("id", &t.disk_id)]),
    }
    match (follow.host, host) {
        (true, Some(h)) => host_xml(w, state, h),
        _ => w.empty(
            "host",
            &[
                ("href", &format!("{}/hosts/{}", state.base, t.host_id)),
                ("id", &t.host_id),
            ],
        ),
    }
    w.empty("image", &[("id", &t.disk_id)]);
    if !t.backup_id.is_empty() {
        w.empty("backup", &[("id", &t.backup_id)]);
    }
    w.close("image_transfer");
    Ok(())
}
