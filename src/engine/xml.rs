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
    /// A backup (not supported).
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
