//! XML as the oVirt API v4 speaks it: a tiny writer for replies and
//! quick-xml/serde types for the request bodies the SDK sends.

use super::error::{Error, Result};
use serde::Deserialize;

/// The content type of every API reply.
pub const CONTENT_TYPE: &str = "application/xml;charset=UTF-8";

/// Builds an XML document element by element. Text and attribute values
/// are escaped; names are ours, never a peer's.
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
}

impl Writer {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    fn start_tag(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.out.push('<');
        self.out.push_str(name);
        for (k, v) in attrs {
            self.out.push(' ');
            self.out.push_str(k);
            self.out.push_str("=\"");
            self.out.push_str(&quick_xml::escape::escape(*v));
            self.out.push('"');
        }
    }

    /// `<name attrs...>`
    pub fn open(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.start_tag(name, attrs);
        self.out.push('>');
    }

    /// `</name>`
    pub fn close(&mut self, name: &str) {
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
    }

    /// `<name attrs.../>`
    pub fn empty(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.start_tag(name, attrs);
        self.out.push_str("/>");
    }

    /// `<name>text</name>`
    pub fn text_element(&mut self, name: &str, text: &str) {
        self.open(name, &[]);
        self.out.push_str(&quick_xml::escape::escape(text));
        self.close(name);
    }

    /// `<name>value</name>` for anything printable (numbers, booleans).
    pub fn value<T: std::fmt::Display>(&mut self, name: &str, value: T) {
        self.text_element(name, &value.to_string());
    }

    /// The document, with a trailing newline.
    pub fn finish(mut self) -> String {
        self.out.push('\n');
        self.out
    }
}

/// Unix time `secs` as the API writes dates (`2026-11-30T13:05:20.000Z`;
/// UTC, which the SDK's reader accepts).
pub fn date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `<action><status>complete</status></action>`, the reply to every action.
pub fn action_complete() -> String {
    let mut w = Writer::new();
    w.open("action", &[]);
    w.text_element("status", "complete");
    w.close("action");
    w.finish()
}

/// A reference to another object: `<disk id="..."/>`.
#[derive(Debug, Default, Deserialize)]
pub struct IdRef {
    /// The `id` attribute.
    #[serde(rename = "@id")]
    pub id: Option<String>,
    /// A `<name>` child, accepted where the SDK lets users pick by name.
    pub name: Option<String>,
}

/// The `<image_transfer>` body of `POST /imagetransfers`. Values stay
/// strings here so that a bad value gets our own precise message.
#[derive(Debug, Default, Deserialize)]
pub struct ImageTransferIn {
    /// upload | download
    pub direction: Option<String>,
    /// raw | cow
    pub format: Option<String>,
    /// seconds
    pub inactivity_timeout: Option<String>,
    /// true | false
    pub shallow: Option<String>,
    /// cancel | legacy | pause
    pub timeout_policy: Option<String>,
    /// The disk to transfer.
    pub disk: Option<IdRef>,
    /// Deprecated form of `disk`.
    pub image: Option<IdRef>,
    /// The host to use.
    pub host: Option<IdRef>,
    /// A disk snapshot (not supported).
    pub snapshot: Option<IdRef>,
    /// The backup whose disk this downloads.
    pub backup: Option<IdRef>,
}

/// `<storage_domains>` inside a disk.
#[derive(Debug, Default, Deserialize)]
pub struct StorageDomainsIn {
    /// The listed domains.
    #[serde(default)]
    pub storage_domain: Vec<IdRef>,
}

/// The `<disk>` body of `POST /disks`.
#[derive(Debug, Default, Deserialize)]
pub struct DiskIn {
    /// The id the client wants (a UUID), or none to get a new one.
    #[serde(rename = "@id")]
    pub id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Older display name.
    pub alias: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// raw | cow
    pub format: Option<String>,
    /// Virtual size in bytes.
    pub provisioned_size: Option<String>,
    /// Where to create it; only `data` exists.
    pub storage_domains: Option<StorageDomainsIn>,
    /// none | incremental
    pub backup: Option<String>,
}

/// A list of `<disk id>` (the disks of a backup; the SDK example sends
/// whole disks, of which only the id counts).
#[derive(Debug, Default, Deserialize)]
pub struct DisksIn {
    /// The listed disks.
    #[serde(default)]
    pub disk: Vec<IdRef>,
}

/// The `<backup>` body of `POST /vms/ID/backups`.
#[derive(Debug, Default, Deserialize)]
pub struct BackupIn {
    /// The id the client wants, or none for a new one.
    #[serde(rename = "@id")]
    pub id: Option<String>,
    /// The disks; none: all disks of the VM.
    pub disks: Option<DisksIn>,
    /// Incremental from this checkpoint.
    pub from_checkpoint_id: Option<String>,
    /// Free text.
    pub description: Option<String>,
}

/// The `<vm>` body of `POST /vms`.
#[derive(Debug, Default, Deserialize)]
pub struct VmIn {
    /// Unique name.
    pub name: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Only `Default` exists.
    pub cluster: Option<IdRef>,
    /// Only `Blank` exists.
    pub template: Option<IdRef>,
}

/// The `<disk_attachment>` body of `POST /vms/ID/diskattachments`.
#[derive(Debug, Default, Deserialize)]
pub struct DiskAttachmentIn {
    /// The existing disk to attach.
    pub disk: Option<IdRef>,
}

/// The local name of the document's root element.
pub fn root_name(body: &str) -> Result<String> {
    let mut reader = quick_xml::Reader::from_str(body);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(e)) | Ok(quick_xml::events::Event::Empty(e)) => {
                return Ok(String::from_utf8_lossy(e.local_name().as_ref()).into_owned());
            }
            Ok(quick_xml::events::Event::Eof) => {
                return Err(Error::BadRequest("The request body is empty".into()));
            }
            Ok(_) => continue,
            Err(e) => return Err(Error::BadRequest(format!("Malformed XML: {e}"))),
        }
    }
}

/// Parse `body` as the element `root` into `T`.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &str, root: &str) -> Result<T> {
    let found = root_name(body)?;
    if found != root {
        return Err(Error::BadRequest(format!(
            "Expected a <{root}> element, got <{found}>"
        )));
    }
    quick_xml::de::from_str(body).map_err(|e| Error::BadRequest(format!("Malformed <{root}>: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_sdk_sends() {
        let body = "<image_transfer>\n  <direction>download</direction>\n  <inactivity_timeout>120</inactivity_timeout>\n  <disk id=\"D\"/>\n  <host id=\"H\"/>\n</image_transfer>\n";
        let t: ImageTransferIn = parse(body, "image_transfer").unwrap();
        assert_eq!(t.direction.as_deref(), Some("download"));
        assert_eq!(t.inactivity_timeout.as_deref(), Some("120"));
        assert_eq!(t.disk.unwrap().id.as_deref(), Some("D"));
        assert_eq!(t.host.unwrap().id.as_deref(), Some("H"));
        assert!(t.snapshot.is_none());
    }

    #[test]
    fn parses_a_disk() {
        let body = "<disk>\n  <format>cow</format>\n  <name>d1</name>\n  <provisioned_size>1048576</provisioned_size>\n  <storage_domains>\n    <storage_domain>\n      <name>data</name>\n    </storage_domain>\n  </storage_domains>\n</disk>\n";
        let d: DiskIn = parse(body, "disk").unwrap();
        assert_eq!(d.format.as_deref(), Some("cow"));
        assert_eq!(d.provisioned_size.as_deref(), Some("1048576"));
        let sd = d.storage_domains.unwrap();
        assert_eq!(sd.storage_domain[0].name.as_deref(), Some("data"));
    }

    #[test]
    fn parses_a_backup_as_the_sdk_example_sends_it() {
        let body = "<backup><description>b</description><from_checkpoint_id>C</from_checkpoint_id>\
            <disks><disk href=\"/x\" id=\"D1\"><alias>a</alias><backup>incremental</backup>\
            <storage_domains><storage_domain id=\"S\"/></storage_domains></disk>\
            <disk id=\"D2\"/></disks></backup>";
        let b: BackupIn = parse(body, "backup").unwrap();
        let ids: Vec<_> = b
            .disks
            .unwrap()
            .disk
            .into_iter()
            .map(|d| d.id.unwrap())
            .collect();
        assert_eq!(ids, ["D1", "D2"]);
        assert_eq!(b.from_checkpoint_id.as_deref(), Some("C"));
        let vm: VmIn = parse(
            "<vm><cluster><name>Default</name></cluster><name>v</name><template><name>Blank</name></template></vm>",
            "vm",
        )
        .unwrap();
        assert_eq!(vm.cluster.unwrap().name.as_deref(), Some("Default"));
        assert_eq!(vm.template.unwrap().name.as_deref(), Some("Blank"));
    }

    #[test]
    fn rejects_the_wrong_root_and_garbage() {
        assert!(matches!(
            parse::<DiskIn>("<vm/>", "disk"),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            parse::<DiskIn>("<disk><format>", "disk"),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            parse::<DiskIn>("", "disk"),
            Err(Error::BadRequest(_))
        ));
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(date(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(date(1_796_037_920), "2026-11-30T11:25:20.000Z");
        assert_eq!(date(-1), "1969-12-31T23:59:59.000Z");
    }

    #[test]
    fn writer_escapes() {
        let mut w = Writer::new();
        w.open("a", &[("id", "x\"<")]);
        w.text_element("b", "1 < 2 & 3");
        w.close("a");
        assert_eq!(
            w.finish(),
            "<a id=\"x&quot;&lt;\"><b>1 &lt; 2 &amp; 3</b></a>\n"
        );
    }
}
