//! A small client of the oVirt engine REST API: SSO login, disks, image
//! transfers and their actions, VMs and their backups. The same calls work
//! against a real engine and `nbdbridge engine`.

use super::error::{Error, Result};
use crate::backend::imageio::{TlsOptions, build_client};
use crate::ovirt::{Action, BackupPhase, Direction, DiskBackupMode, DiskStatus, Format, Phase};
use quick_xml::escape::escape;
use serde::Deserialize;
use std::sync::Mutex;
use std::time::Duration;

/// Longest engine answer accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Timeout of one API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach and log in to an engine (`Debug` hides the password).
#[derive(Clone)]
pub struct EngineConfig {
    /// API base: `https://engine/ovirt-engine/api`.
    pub url: String,
    /// User, e.g. `admin@internal`.
    pub username: String,
    /// Password.
    pub password: String,
    /// TLS settings.
    pub tls: TlsOptions,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("tls", &self.tls)
            .finish()
    }
}

/// What we read of an `image_transfer` (`Debug` cuts the tickets in its
/// URLs short).
#[derive(Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Transfer id.
    pub id: String,
    /// Phase (`Unknown` when the engine sent something we do not know).
    pub phase: Phase,
    /// Direction.
    pub direction: Direction,
    /// URL on the host's imageio daemon.
    pub transfer_url: Option<String>,
    /// URL through the engine's imageio proxy.
    pub proxy_url: Option<String>,
    /// The disk.
    pub disk_id: Option<String>,
    /// Bytes transferred, as the engine counts them.
    pub transferred: Option<u64>,
    /// Inactivity timeout in seconds.
    pub inactivity_timeout: Option<u64>,
    /// `raw` (guest data) or `cow` (the QCOW2 file's own bytes); `None`
    /// when absent or a value we do not know.
    pub format: Option<Format>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = |u: &Option<String>| u.as_deref().map(crate::telemetry::redact_ticket_url);
        f.debug_struct("Transfer")
            .field("id", &self.id)
            .field("phase", &self.phase)
            .field("direction", &self.direction)
            .field("transfer_url", &url(&self.transfer_url))
            .field("proxy_url", &url(&self.proxy_url))
            .field("disk_id", &self.disk_id)
            .field("transferred", &self.transferred)
            .field("inactivity_timeout", &self.inactivity_timeout)
            .field("format", &self.format)
            .finish()
    }
}

/// What we read of a `disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Disk id.
    pub id: String,
    /// Alias (the name users see).
    pub alias: Option<String>,
    /// Virtual size in bytes.
    pub provisioned_size: Option<u64>,
    /// `raw` or `cow` (`None`: absent or unknown).
    pub format: Option<Format>,
    /// `ok`, `locked`, `illegal` (`None`: absent or unknown).
    pub status: Option<DiskStatus>,
    /// Thin provisioned.
    pub sparse: Option<bool>,
}

/// What we read of a `vm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// VM id.
    pub id: String,
    /// Its name (unique in an engine).
    pub name: String,
}

/// What we read of a VM `backup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// Backup id.
    pub id: String,
    /// Phase (`None`: absent or a value we do not know).
    pub phase: Option<BackupPhase>,
    /// The checkpoint it is incremental from (None: a full backup).
    pub from_checkpoint_id: Option<String>,
    /// The checkpoint it creates (None: no disk of it takes part in
    /// incremental backup, or the engine has not set it yet).
    pub to_checkpoint_id: Option<String>,
}

/// A disk of a backup, and how the backup takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDisk {
    /// The disk.
    pub disk: Disk,
    /// `full` or `incremental` (None: the engine did not say).
    pub mode: Option<DiskBackupMode>,
}

#[derive(Debug, Deserialize)]
struct LinkXml {
    #[serde(rename = "@id")]
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TransferXml {
    #[serde(rename = "@id")]
    id: Option<String>,
    phase: Option<String>,
    direction: Option<String>,
    transfer_url: Option<String>,
    proxy_url: Option<String>,
    transferred: Option<u64>,
    inactivity_timeout: Option<u64>,
    format: Option<String>,
    disk: Option<LinkXml>,
    image: Option<LinkXml>,
}

#[derive(Debug, Deserialize)]
struct TransfersXml {
    #[serde(default)]
    image_transfer: Vec<TransferXml>,
}

#[derive(Debug, Deserialize)]
struct DiskXml {
    #[serde(rename = "@id")]
    id: Option<String>,
    alias: Option<String>,
    name: Option<String>,
    provisioned_size: Option<u64>,
    format: Option<String>,
    status: Option<String>,
    sparse: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct DisksXml {
    #[serde(default)]
    disk: Vec<DiskXml>,
}

#[derive(Debug, Deserialize)]
struct VmXml {
    #[serde(rename = "@id")]
    id: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct VmsXml {
    #[serde(default)]
    vm: Vec<VmXml>,
}

#[derive(Debug, Deserialize)]
struct AttachmentXml {
    active: Option<bool>,
    disk: Option<LinkXml>,
}

#[derive(Debug, Deserialize)]
struct AttachmentsXml {
    #[serde(default)]
    disk_attachment: Vec<AttachmentXml>,
}

#[derive(Debug, Deserialize)]
struct BackupXml {
    #[serde(rename = "@id")]
    id: Option<String>,
    phase: Option<String>,
    from_checkpoint_id: Option<String>,
    to_checkpoint_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BackupDiskXml {
    #[serde(rename = "@id")]
    id: Option<String>,
    alias: Option<String>,
    name: Option<String>,
    provisioned_size: Option<u64>,
    format: Option<String>,
    status: Option<String>,
    sparse: Option<bool>,
    backup_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BackupDisksXml {
    #[serde(default)]
    disk: Vec<BackupDiskXml>,
}

#[derive(Debug, Deserialize)]
struct FaultXml {
    reason: Option<String>,
    detail: Option<String>,
}

#[derive(Deserialize)]
struct TokenJson {
    access_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

impl std::fmt::Debug for TokenJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenJson")
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field("error", &self.error)
            .field("error_description", &self.error_description)
            .finish()
    }
}

/// A logged-in engine connection (`Debug` hides the password and token).
pub struct EngineClient {
    api: String,
    origin: String,
    http: reqwest::Client,
    config: EngineConfig,
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for EngineClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let logged_in = self.token.lock().map(|t| t.is_some()).unwrap_or(false);
        f.debug_struct("EngineClient")
            .field("api", &self.api)
            .field("config", &self.config)
            .field("token", &if logged_in { "<redacted>" } else { "none" })
            .finish_non_exhaustive()
    }
}

impl EngineClient {
    /// Log in.
    ///
    /// # Errors
    /// The engine cannot be reached or refuses the credentials.
    pub async fn connect(config: EngineConfig) -> Result<Self> {
        let api = config.url.trim_end_matches('/').to_string();
        let origin =
            origin_of(&api).ok_or_else(|| Error::Config(format!("not an http(s) URL: {api}")))?;
        let http = build_client(&config.tls, None).map_err(Error::Backend)?;
        let client = EngineClient {
            api,
            origin,
            http,
            config,
            token: Mutex::new(None),
        };
        client.login().await?;
        Ok(client)
    }

    async fn login(&self) -> Result<String> {
        let url = format!("{}/ovirt-engine/sso/oauth/token", self.origin);
        let form = format!(
            "grant_type=password&scope=ovirt-app-api&username={}&password={}",
            form_encode(&self.config.username),
            form_encode(&self.config.password)
        );
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .timeout(CALL_TIMEOUT)
            .body(form)
            .send()
            .await
            .map_err(|e| Error::transport("SSO login", &e))?;
        let body = read_body(resp).await?.1;
        let json: TokenJson = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("SSO login: not the expected JSON: {e}")))?;
        if let Some(err) = json.error {
            let why = json.error_description.unwrap_or_default();
            return Err(Error::Auth(format!("{err} {why}").trim().to_string()));
        }
        let token = json
            .access_token
            .ok_or_else(|| Error::Protocol("SSO login: no access_token".into()))?;
        if let Ok(mut t) = self.token.lock() {
            *t = Some(token.clone());
        }
        Ok(token)
    }

    /// Revoke the token (best effort).
    pub async fn logout(&self) {
        let token = self.token.lock().ok().and_then(|t| t.clone());
        let Some(token) = token else { return };
        let url = format!("{}/ovirt-engine/services/sso-logout", self.origin);
        let _ = self
            .http
            .post(&url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .timeout(CALL_TIMEOUT)
            .body(format!("scope=ovirt-app-api&token={}", form_encode(&token)))
            .send()
            .await;
    }

    /// One API call; logs in again once on 401. Returns the body of a 2xx.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Vec<u8>> {
        let url = format!("{}{path}", self.api);
        for attempt in 0..2 {
            let token = match self.token.lock().ok().and_then(|t| t.clone()) {
                Some(t) => t,
                None => self.login().await?,
            };
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("Version", "4")
                .header(reqwest::header::ACCEPT, "application/xml")
                .header(reqwest::header::CONTENT_TYPE, "application/xml")
                .bearer_auth(token)
                .timeout(CALL_TIMEOUT);
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| Error::transport(&format!("{method} {path}"), &e))?;
            let (status, bytes) = read_body(resp).await?;
            if status == 401 && attempt == 0 {
                self.login().await?;
                continue;
            }
            if (200..300).contains(&status) {
                return Ok(bytes);
            }
            let fault: Option<FaultXml> = quick_xml::de::from_reader(bytes.as_slice()).ok();
            let (reason, detail) = fault
                .map(|f| (f.reason.unwrap_or_default(), f.detail.unwrap_or_default()))
                .unwrap_or_else(|| (String::new(), String::from_utf8_lossy(&bytes).into_owned()));
            return Err(Error::Engine {
                status,
                reason,
                detail: detail.trim().to_string(),
            });
        }
        Err(Error::Auth("the engine refused the new token".into()))
    }

    /// Read one transfer.
    ///
    /// # Errors
    /// Unknown transfer (404) or the engine failed.
    pub async fn transfer(&self, id: &str) -> Result<Transfer> {
        let body = self
            .call(
                reqwest::Method::GET,
                &format!("/imagetransfers/{}", path_part(id)),
                None,
            )
            .await?;
        parse_transfer(&body)
    }

    /// Every transfer the engine knows (the real engine lists those not yet
    /// removed).
    ///
    /// # Errors
    /// The engine failed.
    pub async fn transfers(&self) -> Result<Vec<Transfer>> {
        let body = self
            .call(reqwest::Method::GET, "/imagetransfers", None)
            .await?;
        let list: TransfersXml = quick_xml::de::from_reader(body.as_slice())
            .map_err(|e| Error::Protocol(format!("image_transfers XML: {e}")))?;
        list.image_transfer.into_iter().map(transfer_of).collect()
    }

    /// Start a transfer of `disk_id` (on `host_id` if given), always with
    /// `format=raw`: NBD clients read and write guest data, so a QCOW2
    /// disk must be exposed through the engine's qemu-nbd, never as the
    /// QCOW2 file's own bytes (without `<format>` the engine would take the
    /// disk's format).
    ///
    /// # Errors
    /// The engine refused.
    pub async fn add_transfer(
        &self,
        disk_id: &str,
        host_id: Option<&str>,
        direction: Direction,
    ) -> Result<Transfer> {
        let xml = transfer_xml(disk_id, host_id, direction, None);
        let body = self
            .call(reqwest::Method::POST, "/imagetransfers", Some(xml))
            .await?;
        parse_transfer(&body)
    }

    /// Start the download of `disk_id` for the ready backup `backup_id`
    /// (on `host_id` if given), with `format=raw` as the engine requires
    /// for backups: guest data, with the changes since the backup's
    /// checkpoint as the ticket's dirty extents for an incremental disk.
    ///
    /// # Errors
    /// The engine refused (the backup is not ready, the disk not in it).
    pub async fn add_backup_transfer(
        &self,
        disk_id: &str,
        backup_id: &str,
        host_id: Option<&str>,
    ) -> Result<Transfer> {
        let xml = transfer_xml(disk_id, host_id, Direction::Download, Some(backup_id));
        let body = self
            .call(reqwest::Method::POST, "/imagetransfers", Some(xml))
            .await?;
        parse_transfer(&body)
    }

    /// Run an action on a transfer.
    ///
    /// # Errors
    /// The phase does not allow it (409) or the engine failed.
    pub async fn action(&self, id: &str, action: Action) -> Result<()> {
        let path = format!("/imagetransfers/{}/{}", path_part(id), action.as_str());
        self.call(reqwest::Method::POST, &path, Some("<action/>\n".into()))
            .await
            .map(|_| ())
    }

    /// Read one disk.
    ///
    /// # Errors
    /// Unknown disk (404) or the engine failed.
    pub async fn disk(&self, id: &str) -> Result<Disk> {
        let body = self
            .call(
                reqwest::Method::GET,
                &format!("/disks/{}", path_part(id)),
                None,
            )
            .await?;
        let d: DiskXml = quick_xml::de::from_reader(body.as_slice())
            .map_err(|e| Error::Protocol(format!("disk XML: {e}")))?;
        disk_of(d)
    }

    /// The disk whose id or alias is `name`, if any.
    ///
    /// # Errors
    /// The engine failed.
    pub async fn find_disk(&self, name: &str) -> Result<Option<Disk>> {
        let body = self.call(reqwest::Method::GET, "/disks", None).await?;
        let list: DisksXml = quick_xml::de::from_reader(body.as_slice())
            .map_err(|e| Error::Protocol(format!("disks XML: {e}")))?;
        for d in list.disk {
            let disk = disk_of(d)?;
            if disk.id == name || disk.alias.as_deref() == Some(name) {
                return Ok(Some(disk));
            }
        }
        Ok(None)
    }

    /// Create a disk called `alias` of `size` bytes in `format` (`raw` or
    /// `cow`), thin provisioned, on the storage domain `domain` (or the
    /// engine's default).
    ///
    /// # Errors
    /// The engine refused.
    pub async fn add_disk(
        &self,
        alias: &str,
        size: u64,
        format: Format,
        domain: Option<&str>,
    ) -> Result<Disk> {
        let mut xml = String::from("<disk>\n");
        xml.push_str(&format!("  <alias>{}</alias>\n", escape(alias)));
        xml.push_str(&format!("  <format>{format}</format>\n"));
        xml.push_str(&format!("  <name>{}</name>\n", escape(alias)));
        xml.push_str(&format!("  <provisioned_size>{size}</provisioned_size>\n"));
        xml.push_str("  <sparse>true</sparse>\n");
        if let Some(sd) = domain {
            xml.push_str(&format!(
                "  <storage_domains>\n    <storage_domain id=\"{}\"/>\n  </storage_domains>\n",
                escape(sd)
            ));
        }
        xml.push_str("</disk>\n");
        let body = self
            .call(reqwest::Method::POST, "/disks", Some(xml))
            .await?;
        let d: DiskXml = quick_xml::de::from_reader(body.as_slice())
            .map_err(|e| Error::Protocol(format!("disk XML: {e}")))?;
        disk_of(d)
    }

    /// The VM whose id or name is `name`, if any: `GET /vms/ID` when it
    /// looks like an id, else `GET /vms?search=name=NAME` (an engine that
    /// ignores the search lists them all), matched exactly here.
    ///
    /// # Errors
    /// The engine failed.
    pub async fn find_vm(&self, name: &str) -> Result<Option<Vm>> {
        if uuid::Uuid::parse_str(name).is_ok() {
            match self
                .call(
                    reqwest::Method::GET,
                    &format!("/vms/{}", path_part(name)),
                    None,
                )
                .await
            {
                Ok(body) => {
                    let vm: VmXml = quick_xml::de::from_reader(body.as_slice())
                        .map_err(|e| Error::Protocol(format!("vm XML: {e}")))?;
                    return vm_of(vm).map(Some);
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let path = if name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            format!("/vms?search={}", form_encode(&format!("name={name}")))
        } else {
            "/vms".to_string()
        };
        let body = self.call(reqwest::Method::GET, &path, None).await?;
        let list: VmsXml = quick_xml::de::from_reader(body.as_slice())
            .map_err(|e| Error::Protocol(format!("vms XML: {e}")))?;
        let mut found = None;
        for v in list.vm {
            let vm = vm_of(v)?;
            if vm.id == name {
                return Ok(Some(vm));
            }
            if vm.name == name && found.is_none() {
                found = Some(vm);
            }
        }
        Ok(found)
    }

    /// The ids of the disks attached to VM `vm_id` (active attachments;
    /// an attachment that does not say counts as active), in the engine's
    /// order.
    ///
    /// # Errors
    /// Unknown VM (404) or the engine failed.
    pub async fn vm_disk_ids(&self, vm_id: &str) -> Result<Vec<String>> {
        let body = self
            .call(
                reqwest::Method::GET,
                &format!("/vms/{}/diskattachments", path_part(vm_id)),
                None,
            )
            .await?;
        let list: AttachmentsXml = quick_xml::de::from_reader(body.as_slice())
            .map_err(|e| Error::Protocol(format!("disk_attachments XML: {e}")))?;
        let mut ids: Vec<String> = Vec::new();
        for a in list.disk_attachment {
            if a.active == Some(false) {
                continue;
            }
            let id = a
                .disk
                .and_then(|d| d.id)
                .ok_or_else(|| Error::Protocol("disk_attachment without a disk id".into()))?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Start a backup of `disk_ids` of VM `vm_id`, incremental from
    /// `from_checkpoint` when given. The engine answers with the backup
    /// `initializing`.
    ///
    /// # Errors
    /// The engine refused (unknown VM or checkpoint, a backup of the VM
    /// running, a disk locked).
    pub async fn add_backup(
        &self,
        vm_id: &str,
        disk_ids: &[String],
        from_checkpoint: Option<&str>,
        description: &str,
    ) -> Result<Backup> {
        let xml = backup_xml(disk_ids, from_checkpoint, description);
        let body = self
            .call(
                reqwest::Method::POST,
                &format!("/vms/{}/backups", path_part(vm_id)),
                Some(xml),
            )
            .await?;
        parse_backup(&body)
    }

    /// Read backup `id` of VM `vm_id`.
    ///
    /// # Errors
    /// Unknown backup (404) or the engine failed.
    pub async fn backup(&self, vm_id: &str, id: &str) -> Result<Backup> {
        let body = self
            .call(
                reqwest::Method::GET,
                &format!("/vms/{}/backups/{}", path_part(vm_id), path_part(id)),
                None,
            )
            .await?;
        parse_backup(&body)
    }

    /// The disks of backup `id` of VM `vm_id`, each with how the backup
    /// takes it (`full` or `incremental`).
    ///
    /// # Errors
    /// Unknown backup (404) or the engine failed.
    pub async fn backup_disks(&self, vm_id: &str, id: &str) -> Result<Vec<BackupDisk>> {
        let body = self
            .call(
                reqwest::Method::GET,
                &format!("/vms/{}/backups/{}/disks", path_part(vm_id), path_part(id)),
                None,
            )
            .await?;
        let list: BackupDisksXml = quick_xml::de::from_reader(body.as_slice())
            .map_err(|e| Error::Protocol(format!("backup disks XML: {e}")))?;
        list.disk.into_iter().map(backup_disk_of).collect()
    }

    /// Finalize backup `id` of VM `vm_id` (`ready → finalizing →
    /// succeeded`); the engine refuses while a transfer of it is open.
    ///
    /// # Errors
    /// The engine refused.
    pub async fn finalize_backup(&self, vm_id: &str, id: &str) -> Result<()> {
        let path = format!(
            "/vms/{}/backups/{}/finalize",
            path_part(vm_id),
            path_part(id)
        );
        self.call(reqwest::Method::POST, &path, Some("<action/>\n".into()))
            .await
            .map(|_| ())
    }
}

fn vm_of(v: VmXml) -> Result<Vm> {
    let id =
        v.id.ok_or_else(|| Error::Protocol("vm without id".into()))?;
    Ok(Vm {
        name: v.name.unwrap_or_default(),
        id,
    })
}

/// The `<image_transfer>` of a new transfer, in the SDK's order (simple
/// elements alphabetically, then the links).
fn transfer_xml(
    disk_id: &str,
    host_id: Option<&str>,
    direction: Direction,
    backup_id: Option<&str>,
) -> String {
    let mut xml = String::from("<image_transfer>\n");
    xml.push_str(&format!(
        "  <direction>{}</direction>\n",
        direction.as_str()
    ));
    xml.push_str(&format!("  <format>{}</format>\n", Format::Raw));
    if let Some(b) = backup_id {
        xml.push_str(&format!("  <backup id=\"{}\"/>\n", escape(b)));
    }
    xml.push_str(&format!("  <disk id=\"{}\"/>\n", escape(disk_id)));
    if let Some(h) = host_id {
        xml.push_str(&format!("  <host id=\"{}\"/>\n", escape(h)));
    }
    xml.push_str("</image_transfer>\n");
    xml
}

/// The `<backup>` of a new backup of `disk_ids`.
fn backup_xml(disk_ids: &[String], from_checkpoint: Option<&str>, description: &str) -> String {
    let mut xml = String::from("<backup>\n");
    xml.push_str(&format!(
        "  <description>{}</description>\n",
        escape(description)
    ));
    if let Some(c) = from_checkpoint {
        xml.push_str(&format!(
            "  <from_checkpoint_id>{}</from_checkpoint_id>\n",
            escape(c)
        ));
    }
    xml.push_str("  <disks>\n");
    for id in disk_ids {
        xml.push_str(&format!("    <disk id=\"{}\"/>\n", escape(id)));
    }
    xml.push_str("  </disks>\n</backup>\n");
    xml
}

fn parse_backup(body: &[u8]) -> Result<Backup> {
    let b: BackupXml = quick_xml::de::from_reader(body)
        .map_err(|e| Error::Protocol(format!("backup XML: {e}")))?;
    Ok(Backup {
        id: b
            .id
            .ok_or_else(|| Error::Protocol("backup without id".into()))?,
        phase: b.phase.as_deref().and_then(BackupPhase::parse),
        from_checkpoint_id: b.from_checkpoint_id.filter(|c| !c.is_empty()),
        to_checkpoint_id: b.to_checkpoint_id.filter(|c| !c.is_empty()),
    })
}

fn backup_disk_of(d: BackupDiskXml) -> Result<BackupDisk> {
    let mode = d.backup_mode.as_deref().and_then(DiskBackupMode::parse);
    let disk = disk_of(DiskXml {
        id: d.id,
        alias: d.alias,
        name: d.name,
        provisioned_size: d.provisioned_size,
        format: d.format,
        status: d.status,
        sparse: d.sparse,
    })?;
    Ok(BackupDisk { disk, mode })
}

fn parse_transfer(body: &[u8]) -> Result<Transfer> {
    let t: TransferXml = quick_xml::de::from_reader(body)
        .map_err(|e| Error::Protocol(format!("image_transfer XML: {e}")))?;
    transfer_of(t)
}

fn transfer_of(t: TransferXml) -> Result<Transfer> {
    let id =
        t.id.ok_or_else(|| Error::Protocol("image_transfer without id".into()))?;
    let direction = match t.direction.as_deref() {
        Some("download") => Direction::Download,
        _ => Direction::Upload,
    };
    Ok(Transfer {
        id,
        phase: t
            .phase
            .as_deref()
            .and_then(Phase::parse)
            .unwrap_or(Phase::Unknown),
        direction,
        transfer_url: t.transfer_url.filter(|u| !u.is_empty()),
        proxy_url: t.proxy_url.filter(|u| !u.is_empty()),
        disk_id: t.disk.or(t.image).and_then(|l| l.id),
        transferred: t.transferred,
        inactivity_timeout: t.inactivity_timeout,
        format: t.format.as_deref().and_then(Format::parse),
    })
}

fn disk_of(d: DiskXml) -> Result<Disk> {
    Ok(Disk {
        id: d
            .id
            .ok_or_else(|| Error::Protocol("disk without id".into()))?,
        alias: d.alias.or(d.name),
        provisioned_size: d.provisioned_size,
        format: d.format.as_deref().and_then(Format::parse),
        status: d.status.as_deref().and_then(DiskStatus::parse),
        sparse: d.sparse,
    })
}

async fn read_body(mut resp: reqwest::Response) -> Result<(u16, Vec<u8>)> {
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::transport("reading the answer", &e))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(Error::Protocol("engine answer too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

/// `scheme://host:port` of an URL.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let host = rest.split('/').next()?;
    Some(format!("{scheme}://{host}"))
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Ids go into paths: keep only what an id may hold.
fn path_part(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password_token_and_tickets() {
        let config = EngineConfig {
            url: "https://engine/ovirt-engine/api".into(),
            username: "admin@internal".into(),
            password: "hunter2-very-secret".into(),
            tls: TlsOptions::default(),
        };
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("password: \"<redacted>\""), "{text}");
        let token: TokenJson =
            serde_json::from_str(r#"{"access_token": "tok-abcdefghijklmnop"}"#).unwrap();
        let text = format!("{token:?}");
        assert!(!text.contains("tok-abcdefghijklmnop"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        let ticket = "0123456789abcdef0123456789abcdef";
        let t = Transfer {
            id: "t1".into(),
            phase: Phase::Transferring,
            direction: Direction::Upload,
            transfer_url: Some(format!("https://host:54322/images/{ticket}")),
            proxy_url: Some(format!("https://engine:54323/images/{ticket}")),
            disk_id: None,
            transferred: None,
            inactivity_timeout: None,
            format: None,
        };
        let text = format!("{t:?}");
        assert!(!text.contains(ticket), "{text}");
        assert!(text.contains("/images/01234567…"), "{text}");
    }

    #[test]
    fn transfer_xml_of_a_real_engine() {
        let xml = br#"<image_transfer href="/ovirt-engine/api/imagetransfers/e38" id="e38">
  <actions><link href="/x/cancel" rel="cancel"/></actions>
  <active>true</active><direction>upload</direction><format>raw</format>
  <inactivity_timeout>60</inactivity_timeout><phase>transferring</phase>
  <proxy_url>https://engine:54323/images/t</proxy_url>
  <transfer_url>https://host1:54322/images/t</transfer_url>
  <transferred>42</transferred>
  <disk href="/ovirt-engine/api/disks/d1" id="d1"/>
  <host href="/ovirt-engine/api/hosts/h1" id="h1"/><image id="d1"/>
</image_transfer>"#;
        let t = parse_transfer(xml).unwrap();
        assert_eq!(t.id, "e38");
        assert_eq!(t.phase, Phase::Transferring);
        assert_eq!(
            t.transfer_url.as_deref(),
            Some("https://host1:54322/images/t")
        );
        assert_eq!(t.disk_id.as_deref(), Some("d1"));
        assert_eq!(t.transferred, Some(42));
        assert_eq!(t.format, Some(Format::Raw));
        let odd = br#"<image_transfer id="x"><phase>TRANSFERRING</phase><direction>download</direction></image_transfer>"#;
        let t = parse_transfer(odd).unwrap();
        assert_eq!(
            (t.phase, t.direction),
            (Phase::Unknown, Direction::Download)
        );
    }

    #[test]
    fn urls_and_forms() {
        assert_eq!(
            origin_of("https://e.example:8443/ovirt-engine/api").as_deref(),
            Some("https://e.example:8443")
        );
        assert!(origin_of("ftp://x/").is_none());
        assert_eq!(form_encode("admin@internal"), "admin%40internal");
        assert_eq!(path_part("ab-1/../x"), "ab-1x");
    }

    #[test]
    fn vms_attachments_backups_and_their_disks() {
        let vms = br#"<vms><vm href="/ovirt-engine/api/vms/v1" id="v1"><link href="/x" rel="backups"/><link href="/y" rel="checkpoints"/><description></description><name>vm1</name><status>down</status><cluster href="/c" id="c"/><template href="/t" id="t"/></vm></vms>"#;
        let l: VmsXml = quick_xml::de::from_reader(&vms[..]).unwrap();
        let v: Vec<Vm> = l.vm.into_iter().map(|v| vm_of(v).unwrap()).collect();
        assert_eq!(
            v,
            [Vm {
                id: "v1".into(),
                name: "vm1".into()
            }]
        );
        let atts = br#"<disk_attachments><disk_attachment href="/a" id="d1"><active>true</active><bootable>false</bootable><interface>virtio_scsi</interface><disk href="/disks/d1" id="d1"/><vm href="/vms/v1" id="v1"/></disk_attachment><disk_attachment id="d2"><active>false</active><disk id="d2"/></disk_attachment></disk_attachments>"#;
        let l: AttachmentsXml = quick_xml::de::from_reader(&atts[..]).unwrap();
        assert_eq!(l.disk_attachment.len(), 2);
        assert_eq!(
            l.disk_attachment[0]
                .disk
                .as_ref()
                .and_then(|d| d.id.as_deref()),
            Some("d1")
        );
        assert_eq!(l.disk_attachment[1].active, Some(false));
        let b = parse_backup(br#"<backup href="/b" id="b1"><actions><link href="/f" rel="finalize"/></actions><link href="/d" rel="disks"/><creation_date>2026-11-30T11:25:20.000Z</creation_date><description>d</description><from_checkpoint_id>c0</from_checkpoint_id><phase>ready</phase><to_checkpoint_id>c1</to_checkpoint_id><vm href="/vms/v1" id="v1"/></backup>"#).unwrap();
        assert_eq!(
            b,
            Backup {
                id: "b1".into(),
                phase: Some(BackupPhase::Ready),
                from_checkpoint_id: Some("c0".into()),
                to_checkpoint_id: Some("c1".into()),
            }
        );
        let disks = br#"<disks><disk href="/disks/d1" id="d1"><actual_size>0</actual_size><alias>a</alias><backup>incremental</backup><backup_mode>incremental</backup_mode><format>cow</format><name>a</name><provisioned_size>10</provisioned_size><status>locked</status><storage_domains><storage_domain id="s"/></storage_domains></disk></disks>"#;
        let l: BackupDisksXml = quick_xml::de::from_reader(&disks[..]).unwrap();
        let d = backup_disk_of(l.disk.into_iter().next().unwrap()).unwrap();
        assert_eq!(d.mode, Some(DiskBackupMode::Incremental));
        assert_eq!(d.disk.alias.as_deref(), Some("a"));
        assert_eq!(d.disk.provisioned_size, Some(10));
        // The SDK's order: simple elements alphabetically, then the links.
        assert_eq!(
            transfer_xml("d", None, Direction::Download, Some("b")),
            "<image_transfer>\n  <direction>download</direction>\n  <format>raw</format>\n  \
             <backup id=\"b\"/>\n  <disk id=\"d\"/>\n</image_transfer>\n"
        );
        assert_eq!(
            backup_xml(&["d1".to_string()], Some("c<"), "x"),
            "<backup>\n  <description>x</description>\n  \
             <from_checkpoint_id>c&lt;</from_checkpoint_id>\n  <disks>\n    \
             <disk id=\"d1\"/>\n  </disks>\n</backup>\n"
        );
    }

    #[test]
    fn disks_list() {
        let xml = br#"<disks><disk id="a"><alias>one</alias><provisioned_size>10</provisioned_size><status>ok</status></disk><disk id="b"><name>two</name></disk></disks>"#;
        let l: DisksXml = quick_xml::de::from_reader(&xml[..]).unwrap();
        assert_eq!(l.disk.len(), 2);
        let d = disk_of(l.disk.into_iter().nth(1).unwrap()).unwrap();
        assert_eq!(d.alias.as_deref(), Some("two"));
    }
}
