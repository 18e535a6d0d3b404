//! Wildcard event-type patterns (NATS subject rules) and the segment trie that routes one
//! type to every matching subscription without scanning them all.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::{MAX_TYPE_LEN, is_segment};

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid pattern {0:?}: use dot-separated segments of letters, digits, '_' or '-', where '*' stands for one segment and a final '>' for one or more (e.g. \"memory.*\", \"assistant.>\")"
)]
pub struct InvalidPattern(pub String);

/// One segment of a parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(Box<str>),
    /// `*`: exactly one segment.
    Any,
    /// `>`: one or more trailing segments (only last).
    Rest,
}

/// A parsed event-type pattern such as `memory.*` or `assistant.>`.
///
/// `*` matches exactly one segment; `>` as the last segment matches one or more segments.
/// These are NATS subject rules, so a pattern passes unchanged to the distributed backend.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Box<str>,
    segments: Box<[Segment]>,
}

impl Pattern {
    /// Parses `s`; fails on empty segments, bad characters, or `>` anywhere but last.
    pub fn new(s: &str) -> Result<Self, InvalidPattern> {
        let err = || InvalidPattern(s.to_owned());
        if s.len() > MAX_TYPE_LEN {
            return Err(err());
        }
        let parts: Vec<&str> = s.split('.').collect();
        let last = parts.len() - 1;
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.into_iter().enumerate() {
            segments.push(match part {
                "*" => Segment::Any,
                ">" if i == last => Segment::Rest,
                p if is_segment(p) => Segment::Literal(p.into()),
                _ => return Err(err()),
            });
        }
        Ok(Self {
            text: s.into(),
            segments: segments.into(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the pattern has no wildcard, so it matches exactly one type.
    pub fn is_literal(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }

    /// True when `event_type` (a valid type) matches this pattern.
    pub fn matches(&self, event_type: &str) -> bool {
        let mut parts = event_type.split('.');
        for seg in self.segments.iter() {
            match seg {
                Segment::Rest => return parts.next().is_some(),
                Segment::Any => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.next() != Some(&**l) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.text)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Pattern {
    type Err = InvalidPattern;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Pattern::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A set of patterns matched together; matches when any one does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatternSet(Vec<Pattern>);

impl PatternSet {
    /// A set matching every type (`>`).
    pub fn all() -> Self {
        Self(vec![Pattern::new(">").expect("'>' is a valid pattern")])
    }

    /// Builds a set from patterns; an empty set matches nothing.
    pub fn new(patterns: Vec<Pattern>) -> Self {
        Self(patterns)
    }

    /// Parses a comma-separated list such as `memory.*,assistant.>`.
    pub fn parse_list(s: &str) -> Result<Self, InvalidPattern> {
        s.split(',')
            .map(|p| Pattern::new(p.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// True when any pattern matches `event_type`.
    pub fn matches(&self, event_type: &str) -> bool {
        self.0.iter().any(|p| p.matches(event_type))
    }

    /// The patterns in the set.
    pub fn patterns(&self) -> &[Pattern] {
        &self.0
    }
}

/// Routes an event type to the values of every matching pattern.
///
/// A segment trie: lookup cost grows with the number of segments in the type and the
/// wildcards on its path, not with the number of patterns inserted.
#[derive(Debug)]
pub struct Router<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    literal: HashMap<Box<str>, Node<T>>,
    any: Option<Box<Node<T>>>,
    /// Values of patterns ending here with `>`.
    rest: Vec<T>,
    /// Values of patterns ending exactly here.
    here: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            literal: HashMap::new(),
            any: None,
            rest: Vec::new(),
            here: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.any.is_none()
            && self.rest.is_empty()
            && self.here.is_empty()
    }
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T: PartialEq> Router<T> {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (pattern, value) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is routed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Routes `pattern` to `value`.
    pub fn insert(&mut self, pattern: &Pattern, value: T) {
        let mut node = &mut self.root;
        for seg in pattern.segments.iter() {
            match seg {
                Segment::Literal(l) => node = node.literal.entry(l.clone()).or_default(),
                Segment::Any => node = node.any.get_or_insert_with(Default::default),
                Segment::Rest => {
                    node.rest.push(value);
                    self.len += 1;
                    return;
                }
            }
        }
        node.here.push(value);
        self.len += 1;
    }

    /// Removes one entry routing `pattern` to `value`; returns whether one was found.
    pub fn remove(&mut self, pattern: &Pattern, value: &T) -> bool {
        let removed = Self::remove_in(&mut self.root, &pattern.segments, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_in(node: &mut Node<T>, segs: &[Segment], value: &T) -> bool {
        let take = |v: &mut Vec<T>| match v.iter().position(|x| x == value) {
            Some(i) => {
                v.swap_remove(i);
                true
            }
            None => false,
        };
        match segs.split_first() {
            None => take(&mut node.here),
            Some((Segment::Rest, _)) => take(&mut node.rest),
            Some((Segment::Any, rest)) => {
                let Some(child) = node.any.as_deref_mut() else {
                    return false;
                };
                let removed = Self::remove_in(child, rest, value);
                if child.is_empty() {
                    node.any = None;
                }
                removed
            }
            Some((Segment::Literal(l), rest)) => {
                let Some(child) = node.literal.get_mut(l) else {
                    return false;
                };
                let removed = Self::remove_in(child, rest, value);
                if child.is_empty() {
                    node.literal.remove(l);
                }
                removed
            }
        }
    }

    /// Calls `f` with the value of every pattern matching `event_type`.
    ///
    /// A value inserted under several matching patterns is visited once per pattern.
    pub fn for_each_match<'a>(&'a self, event_type: &str, mut f: impl FnMut(&'a T)) {
        let segs: smallvec_free::Segs<'_> = smallvec_free::split(event_type);
        Self::visit(&self.root, segs.as_slice(), &mut f);
    }

    /// The values of every pattern matching `event_type`.
    pub fn matches(&self, event_type: &str) -> Vec<&T> {
        let mut out = Vec::new();
        self.for_each_match(event_type, |v| out.push(v));
        out
    }

    fn visit<'a>(node: &'a Node<T>, segs: &[&str], f: &mut impl FnMut(&'a T)) {
        let Some((first, rest)) = segs.split_first() else {
            node.here.iter().for_each(&mut *f);
            return;
        };
        node.rest.iter().for_each(&mut *f);
        if let Some(child) = node.literal.get(*first) {
            Self::visit(child, rest, f);
        }
        if let Some(child) = node.any.as_deref() {
            Self::visit(child, rest, f);
        }
    }
}

/// Splits a type into segments on the stack for the common case (≤ 8 segments).
mod smallvec_free {
    pub(super) enum Segs<'a> {
        Inline([&'a str; 8], usize),
        Heap(Vec<&'a str>),
    }

    impl<'a> Segs<'a> {
        pub(super) fn as_slice(&self) -> &[&'a str] {
            match self {
                Segs::Inline(a, n) => &a[..*n],
                Segs::Heap(v) => v,
            }
        }
    }

    pub(super) fn split(s: &str) -> Segs<'_> {
        let mut a = [""; 8];
        let mut n = 0;
        for part in s.split('.') {
            if n == a.len() {
                return Segs::Heap(s.split('.').collect());
            }
            a[n] = part;
            n += 1;
        }
        Segs::Inline(a, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    #[test]
    fn wildcards_follow_nats_rules() {
        let cases = [
            ("memory.*", "memory.created", true),
            ("memory.*", "memory.create.completed", false),
            ("memory.*", "memory", false),
            ("memory.>", "memory.created", true),
            ("memory.>", "memory.create.completed", true),
            ("memory.>", "memory", false),
            ("*.*.failed", "tool.invocation.failed", true),
            ("*.*.failed", "tool.failed", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("*", "a", true),
            ("*", "a.b", false),
            ("a.b", "a.b", true),
            ("a.b", "a.b.c", false),
            ("a.*.c", "a.x.c", true),
        ];
        for (pat, ty, want) in cases {
            assert_eq!(p(pat).matches(ty), want, "{pat} vs {ty}");
        }
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in [
            "", "a.", ".a", "a..b", ">.a", "a.>.b", "a*", "a.b*", "**", "a b",
        ] {
            assert_eq!(Pattern::new(bad), Err(InvalidPattern(bad.into())), "{bad}");
        }
    }

    #[test]
    fn router_removes_entries_and_prunes() {
        let mut r = Router::new();
        r.insert(&p("a.*"), 1);
        r.insert(&p("a.>"), 2);
        r.insert(&p("a.b"), 3);
        let mut m: Vec<_> = r.matches("a.b").into_iter().copied().collect();
        m.sort();
        assert_eq!(m, vec![1, 2, 3]);
        assert!(r.remove(&p("a.*"), &1));
        assert!(!r.remove(&p("a.*"), &1));
        assert!(r.remove(&p("a.b"), &3));
        assert_eq!(r.matches("a.b"), vec![&2]);
        assert!(r.remove(&p("a.>"), &2));
        assert!(r.is_empty());
        assert!(r.root.is_empty());
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c-1".to_string())
        ]
    }

    fn event_type() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 1..5).prop_map(|v| v.join("."))
    }

    fn pattern() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(
                prop_oneof![3 => segment(), 1 => Just("*".to_string())],
                1..5,
            ),
            any::<bool>(),
        )
            .prop_map(|(mut v, rest)| {
                if rest {
                    *v.last_mut().unwrap() = ">".into();
                }
                v.join(".")
            })
    }

    /// A deliberately naive matcher written from the rules, to check the trie against.
    fn naive(pattern: &str, ty: &str) -> bool {
        let ps: Vec<&str> = pattern.split('.').collect();
        let ts: Vec<&str> = ty.split('.').collect();
        for (i, seg) in ps.iter().enumerate() {
            if *seg == ">" {
                return ts.len() > i;
            }
            if i >= ts.len() || (*seg != "*" && *seg != ts[i]) {
                return false;
            }
        }
        ps.len() == ts.len()
    }

    proptest! {
        #[test]
        fn pattern_matches_like_the_naive_matcher(pat in pattern(), ty in event_type()) {
            prop_assert_eq!(p(&pat).matches(&ty), naive(&pat, &ty));
        }

        #[test]
        fn router_returns_exactly_the_naively_matching_patterns(
            pats in prop::collection::vec(pattern(), 0..40),
            types in prop::collection::vec(event_type(), 1..20),
        ) {
            let mut r = Router::new();
            for (i, pat) in pats.iter().enumerate() {
                r.insert(&p(pat), i);
            }
            for ty in &types {
                let mut got: Vec<usize> = r.matches(ty).into_iter().copied().collect();
                got.sort();
                let want: Vec<usize> = pats.iter().enumerate()
                    .filter(|(_, pat)| naive(pat, ty)).map(|(i, _)| i).collect();
                prop_assert_eq!(got, want, "type {}", ty);
            }
            // Removing everything leaves an empty trie.
            for (i, pat) in pats.iter().enumerate() {
                prop_assert!(r.remove(&p(pat), &i));
            }
            prop_assert!(r.is_empty());
        }
    }
}
