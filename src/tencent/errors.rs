//! What an API answer means (docs/messages.md, "What happens to an update"), as a pure function.

use std::fmt;

/// What came back for one request, before interpretation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// HTTP 200 with a parseable body.
    Body {
        /// `ActionStatus == "OK"`.
        action_ok: bool,
        /// `ErrorCode`.
        code: i64,
        /// `ErrorInfo`.
        info: String,
    },
    /// A status other than 200.
    HttpStatus(u16),
    /// No answer within `tencent.timeout_ms`.
    Timeout,
    /// Could not connect or the connection broke (no URL in the text).
    Connection(String),
    /// HTTP 200 but the body is not the API's JSON.
    Unparseable(String),
}

impl Reply {
    /// The ErrorCode to record when this reply leads to a dead letter
    /// (0 for failures without one).
    pub fn code(&self) -> i64 {
        match self {
            Reply::Body { code, .. } => *code,
            _ => 0,
        }
    }

    /// Human-readable description: the ErrorInfo, or what went wrong.
    pub fn info(&self) -> String {
        match self {
            Reply::Body { info, code, .. } if info.is_empty() => format!("ErrorCode {code}"),
            Reply::Body { info, .. } => info.clone(),
            Reply::HttpStatus(s) => format!("HTTP status {s}"),
            Reply::Timeout => "request timed out".into(),
            Reply::Connection(e) => format!("connection error: {e}"),
            Reply::Unparseable(e) => format!("unparseable response: {e}"),
        }
    }
}

/// The class of an answer, which decides what the worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Applied.
    Success,
    /// Retry the same request with backoff.
    Transient,
    /// Back off and lower the request rate; never dead-letter.
    RateLimited,
    /// Renew the UserSig and retry at once, once.
    Signature,
    /// 90018: split the request in halves.
    TooManyAccounts,
    /// Bisect to isolate the bad accounts/messages and dead-letter them.
    Rejected,
    /// Pause consuming, dead-letter nothing, probe with backoff.
    Misconfigured,
    /// A code not in the table: as transient, keeping the code.
    Unknown,
}

impl Class {
    /// A short lowercase name, for logs and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Class::Success => "success",
            Class::Transient => "transient",
            Class::RateLimited => "rate_limited",
            Class::Signature => "signature",
            Class::TooManyAccounts => "too_many_accounts",
            Class::Rejected => "rejected",
            Class::Misconfigured => "misconfigured",
            Class::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Codes that are retried as they are.
pub(crate) const TRANSIENT_CODES: &[i64] = &[91000, 60008, 60013, 60014, 70169, 70500];
/// Codes of the frequency limit.
pub(crate) const RATE_LIMITED_CODES: &[i64] = &[60007, 60011, 60018, 60019];
/// Codes that mean the UserSig expired.
pub(crate) const SIGNATURE_EXPIRED_CODES: &[i64] = &[70001, 70052];
/// Codes that mean the UserSig is bad: renewed once, then misconfigured.
pub(crate) const SIGNATURE_ONCE_CODES: &[i64] = &[60004, 60005, 70003, 70005];
/// Too many accounts in one request.
pub(crate) const TOO_MANY_ACCOUNTS_CODE: i64 = 90018;
/// Codes that reject the content of the request.
pub(crate) const REJECTED_CODES: &[i64] = &[90033, 90001, 60003, 60015, 70107, 70402];
/// Codes that mean the deployment is wrong, not the data.
pub(crate) const MISCONFIGURED_CODES: &[i64] = &[
    90009, 60002, 60006, 60009, 60010, 60012, 60016, 60017, 60020, 60021, 70009, 70013, 70014,
    70016, 70020, 70050, 70114, 70398, 70403, 90045,
];

/// Classifies a reply (the table in docs/messages.md).
pub(crate) fn classify(reply: &Reply) -> Class {
    match reply {
        Reply::HttpStatus(_) | Reply::Timeout | Reply::Connection(_) | Reply::Unparseable(_) => {
            Class::Transient
        }
        Reply::Body {
            action_ok, code, ..
        } => classify_code(*action_ok, *code),
    }
}

/// Classifies an `ActionStatus`/`ErrorCode` pair.
pub(crate) fn classify_code(action_ok: bool, code: i64) -> Class {
    if code == 0 {
        return if action_ok {
            Class::Success
        } else {
            Class::Unknown
        };
    }
    if TRANSIENT_CODES.contains(&code) {
        Class::Transient
    } else if RATE_LIMITED_CODES.contains(&code) {
        Class::RateLimited
    } else if SIGNATURE_EXPIRED_CODES.contains(&code) || SIGNATURE_ONCE_CODES.contains(&code) {
        Class::Signature
    } else if code == TOO_MANY_ACCOUNTS_CODE {
        Class::TooManyAccounts
    } else if REJECTED_CODES.contains(&code) {
        Class::Rejected
    } else if MISCONFIGURED_CODES.contains(&code) {
        Class::Misconfigured
    } else {
        Class::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: i64) -> Reply {
        Reply::Body {
            action_ok: code == 0,
            code,
            info: String::new(),
        }
    }

    #[test]
    fn every_code_of_the_contract_table() {
        let table: &[(&[i64], Class)] = &[
            (
                &[91000, 60008, 60013, 60014, 70169, 70500],
                Class::Transient,
            ),
            (&[60007, 60011, 60018, 60019], Class::RateLimited),
            (
                &[70001, 70052, 60004, 60005, 70003, 70005],
                Class::Signature,
            ),
            (&[90018], Class::TooManyAccounts),
            (&[90033, 90001, 60003, 60015, 70107, 70402], Class::Rejected),
            (
                &[
                    90009, 60002, 60006, 60009, 60010, 60012, 60016, 60017, 60020, 60021, 70009,
                    70013, 70014, 70016, 70020, 70050, 70114, 70398, 70403, 90045,
                ],
                Class::Misconfigured,
            ),
            (&[1, 12345, 70000, 90000, 99999, -1], Class::Unknown),
        ];
        let mut seen = std::collections::HashSet::new();
        for (codes, class) in table {
            for &code in *codes {
                assert!(seen.insert(code), "code {code} listed twice");
                assert_eq!(classify(&body(code)), *class, "code {code}");
                // ActionStatus FAIL is what the API sends with a code; same class.
                let fail = Reply::Body {
                    action_ok: false,
                    code,
                    info: "x".into(),
                };
                assert_eq!(classify(&fail), *class, "code {code} with FAIL");
            }
        }
    }

    #[test]
    fn success_and_odd_bodies() {
        assert_eq!(classify(&body(0)), Class::Success);
        let fail_zero = Reply::Body {
            action_ok: false,
            code: 0,
            info: String::new(),
        };
        assert_eq!(classify(&fail_zero), Class::Unknown);
    }

    #[test]
    fn transport_failures_are_transient() {
        for r in [
            Reply::HttpStatus(502),
            Reply::HttpStatus(500),
            Reply::HttpStatus(404),
            Reply::Timeout,
            Reply::Connection("connection refused".into()),
            Reply::Unparseable("expected value at line 1".into()),
        ] {
            assert_eq!(classify(&r), Class::Transient, "{r:?}");
            assert_eq!(r.code(), 0);
            assert!(!r.info().is_empty());
        }
    }

    #[test]
    fn info_and_code() {
        let r = Reply::Body {
            action_ok: false,
            code: 90033,
            info: "Invalid attribute".into(),
        };
        assert_eq!(r.code(), 90033);
        assert_eq!(r.info(), "Invalid attribute");
        assert_eq!(body(91000).info(), "ErrorCode 91000");
    }
}
