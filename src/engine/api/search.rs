//! `GET /disks?search=...`: the part of the oVirt search language that
//! disks need, and a 400 for everything else (never a silently ignored
//! condition, which would return disks the caller did not ask for).
//!
//! Served: `FIELD OP VALUE` terms joined by `and` (any case), with FIELD
//! one of `name`, `alias` (the same thing here), `id` and `status`
//! (field names in any case), OP `=` or `!=`, VALUE a word or a
//! `"quoted string"` where `*` matches any run of characters. Values are
//! compared case-sensitively unless `case_sensitive=false` (the API's
//! default is true); ids and statuses never depend on case. `max=N` caps
//! the result (a negative N: no cap).
//!
//! Refused: `or`, `sortby`, `page`, other operators (`<`, `>`, ...),
//! other fields, free text and the `Disks:` prefix of the admin portal.

use super::super::error::{Error, Result};
use super::super::model::{Disk, DiskStatus};
use super::super::sso;

/// A parsed `GET /disks` query.
#[derive(Debug, Default)]
pub struct DiskQuery {
    terms: Vec<Term>,
    case_sensitive: bool,
    max: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Id,
    Status,
}

#[derive(Debug)]
struct Term {
    field: Field,
    negate: bool,
    value: String,
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
    Op(String),
}

fn bad(why: impl std::fmt::Display) -> Error {
    Error::BadRequest(format!("Cannot search disks: {why}"))
}

fn tokenize(s: &str) -> Result<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut text = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(ch) => text.push(ch),
                    None => return Err(bad(format!("unterminated quote in '{s}'"))),
                }
            }
            tokens.push(Token::Quoted(text));
        } else if "=!<>".contains(c) {
            let mut op = String::new();
            while let Some(&ch) = chars.peek() {
                if !"=!<>".contains(ch) {
                    break;
                }
                op.push(ch);
                chars.next();
            }
            tokens.push(Token::Op(op));
        } else {
            let mut word = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() || "=!<>\"".contains(ch) {
                    break;
                }
                word.push(ch);
                chars.next();
            }
            tokens.push(Token::Word(word));
        }
    }
    Ok(tokens)
}

fn field(name: &str) -> Result<Field> {
    match name.to_ascii_lowercase().as_str() {
        "name" | "alias" => Ok(Field::Name),
        "id" => Ok(Field::Id),
        "status" => Ok(Field::Status),
        _ => Err(bad(format!(
            "unknown field '{name}'; disks can be searched by name, alias, id and status"
        ))),
    }
}

/// Parse the terms of a search string (empty: no condition).
fn parse_search(search: &str) -> Result<Vec<Term>> {
    let tokens = tokenize(search)?;
    let mut terms = Vec::new();
    let mut it = tokens.into_iter().peekable();
    while it.peek().is_some() {
        if !terms.is_empty() {
            match it.next() {
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("and") => {}
                Some(Token::Word(w))
                    if ["or", "sortby", "page"]
                        .iter()
                        .any(|k| w.eq_ignore_ascii_case(k)) =>
                {
                    return Err(bad(format!(
                        "'{}' is not supported; join conditions with 'and'",
                        w.to_ascii_lowercase()
                    )));
                }
                _ => {
                    return Err(bad(format!(
                        "expected 'and' between conditions in '{search}'"
                    )));
                }
            }
        }
        let (name, op) = match (it.next(), it.next()) {
            (Some(Token::Word(name)), Some(Token::Op(op))) => (name, op),
            _ => return Err(bad(format!("expected FIELD=VALUE in '{search}'"))),
        };
        let negate = match op.as_str() {
            "=" => false,
            "!=" => true,
            _ => {
                return Err(bad(format!(
                    "unsupported operator '{op}' in '{search}'; use = or !="
                )));
            }
        };
        let field = field(&name)?;
        let value = match it.peek() {
            Some(Token::Quoted(_)) | Some(Token::Word(_)) => match it.next() {
                Some(Token::Quoted(v)) | Some(Token::Word(v)) => v,
                _ => String::new(),
            },
            _ => String::new(),
        };
        let is_and = value.eq_ignore_ascii_case("and");
        if value.is_empty() || is_and {
            return Err(bad(format!("empty value for '{name}' in '{search}'")));
        }
        if field == Field::Status && DiskStatus::parse(&value.to_ascii_lowercase()).is_none() {
            return Err(bad(format!(
                "'{value}' is not a disk status (ok, locked, illegal)"
            )));
        }
        terms.push(Term {
            field,
            negate,
            value,
        });
    }
    Ok(terms)
}

/// Whether `text` matches `pattern`, where `*` matches any run of
/// characters.
fn glob(pattern: &[char], text: &[char]) -> bool {
    // Iterative matching with backtracking to the last '*'.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(c) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

impl DiskQuery {
    /// Parse the query string of `GET /disks`: `search`, `case_sensitive`
    /// and `max`; other parameters are ignored.
    ///
    /// # Errors
    /// 400 for search syntax we do not serve, or bad values.
    pub fn parse(query: &str) -> Result<DiskQuery> {
        let mut q = DiskQuery {
            case_sensitive: true,
            ..DiskQuery::default()
        };
        for (k, v) in sso::parse_form(query) {
            match k.as_str() {
                "search" => q.terms = parse_search(&v)?,
                "case_sensitive" => {
                    q.case_sensitive = match v.to_ascii_lowercase().as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(Error::BadRequest(format!(
                                "Invalid value '{v}' for 'case_sensitive'"
                            )));
                        }
                    }
                }
                "max" => {
                    let n = v
                        .parse::<i64>()
                        .map_err(|_| Error::BadRequest(format!("Invalid value '{v}' for 'max'")))?;
                    q.max = usize::try_from(n).ok();
                }
                _ => {}
            }
        }
        Ok(q)
    }

    fn matches(&self, d: &Disk) -> bool {
        self.terms.iter().all(|t| {
            let hit = match t.field {
                Field::Name => {
                    let (p, s) = if self.case_sensitive {
                        (t.value.clone(), d.name.clone())
                    } else {
                        (t.value.to_lowercase(), d.name.to_lowercase())
                    };
                    glob(
                        &p.chars().collect::<Vec<_>>(),
                        &s.chars().collect::<Vec<_>>(),
                    )
                }
                Field::Id => {
                    let p: Vec<char> = t.value.to_ascii_lowercase().chars().collect();
                    glob(&p, &d.id.to_ascii_lowercase().chars().collect::<Vec<_>>())
                }
                Field::Status => t.value.eq_ignore_ascii_case(d.status.as_str()),
            };
            hit != t.negate
        })
    }

    /// The disks of `all` that match, at most `max` of them.
    pub fn select(&self, all: Vec<Disk>) -> Vec<Disk> {
        all.into_iter()
            .filter(|d| self.matches(d))
            .take(self.max.unwrap_or(usize::MAX))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{DiskBackup, Format};

    fn disk(name: &str, id: &str, status: DiskStatus) -> Disk {
        Disk {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            format: Format::Raw,
            provisioned_size: 1,
            status,
            backup: DiskBackup::None,
        }
    }

    fn names(query: &str) -> Result<Vec<String>> {
        let all = vec![
            disk("alpha-1", "A1", DiskStatus::Ok),
            disk("alpha 2", "a2", DiskStatus::Locked),
            disk("beta", "b", DiskStatus::Ok),
        ];
        let q = DiskQuery::parse(query)?;
        Ok(q.select(all).into_iter().map(|d| d.name).collect())
    }

    #[test]
    fn selects() {
        assert_eq!(names("search=name%3Dalpha-1").unwrap(), ["alpha-1"]);
        assert_eq!(
            names("search=name%3Dalpha*").unwrap(),
            ["alpha-1", "alpha 2"]
        );
        assert_eq!(names("search=name%3D%22alpha+2%22").unwrap(), ["alpha 2"]);
        assert_eq!(names("search=id%3Da1").unwrap(), ["alpha-1"]);
        assert_eq!(names("search=status%3DLOCKED").unwrap(), ["alpha 2"]);
        assert_eq!(
            names("search=name%3D*a*+and+status!%3Dlocked").unwrap(),
            ["alpha-1", "beta"]
        );
        assert_eq!(names("search=name%3DBETA").unwrap(), Vec::<String>::new());
        assert_eq!(
            names("search=name%3DBETA&case_sensitive=false").unwrap(),
            ["beta"]
        );
        assert_eq!(names("max=1").unwrap(), ["alpha-1"]);
        assert_eq!(names("max=-1").unwrap().len(), 3);
        assert_eq!(names("").unwrap().len(), 3);
    }

    #[test]
    fn refuses() {
        for (q, text) in [
            ("search=name%3Da+or+name%3Db", "'or' is not supported"),
            ("search=name%3Da+sortby+name", "'sortby' is not supported"),
            ("search=name%3Da+name%3Db", "expected 'and'"),
            ("search=size>1", "unsupported operator '>'"),
            ("search=size%3D1", "unknown field 'size'"),
            ("search=alpha", "expected FIELD=VALUE"),
            ("search=name%3D", "empty value"),
            ("search=name%3Dand", "empty value"),
            ("search=status%3Dx", "'x' is not a disk status"),
            ("search=name%3D%22a", "unterminated quote"),
            ("max=x", "'max'"),
            ("case_sensitive=maybe", "'case_sensitive'"),
        ] {
            match names(q) {
                Err(Error::BadRequest(m)) => assert!(m.contains(text), "{q}: {m}"),
                other => panic!("{q}: {other:?}"),
            }
        }
    }

    #[test]
    fn globs() {
        let g = |p: &str, t: &str| {
            glob(
                &p.chars().collect::<Vec<_>>(),
                &t.chars().collect::<Vec<_>>(),
            )
        };
        assert!(g("a*c", "abbbc"));
        assert!(g("*", ""));
        assert!(g("a**", "a"));
        assert!(!g("a*c", "abcd"));
        assert!(g("*b*b", "abab"));
        assert!(!g("abc", "ab"));
    }
}
