//! A page of a stored response's input items (`GET /v1/responses/{id}/input_items`), as
//! OpenAI pages them: `order` `desc` (its default: the last item first) or `asc`, at
//! most `limit` items (1–100, default 20): the first after the item named by `after`, or
//! (with `before` alone) the last before the one named by `before`, and `has_more` when
//! the list goes on past the page in that direction.

use std::collections::HashMap;

use super::wire::{Item, ItemList};
use crate::error::ApiError;

const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

/// What the query asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    limit: usize,
    desc: bool,
    after: Option<String>,
    before: Option<String>,
}

impl Page {
    /// Reads `limit`, `order`, `after` and `before`; other parameters (`include`) change
    /// nothing here.
    pub fn from_query(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let limit = match query.get("limit") {
            None => DEFAULT_LIMIT,
            Some(v) => match v.parse::<usize>() {
                Ok(n @ 1..=MAX_LIMIT) => n,
                _ => {
                    return Err(ApiError::bad(
                        "limit",
                        format!("`limit` must be an integer from 1 to {MAX_LIMIT}, not {v:?}"),
                    ))
                }
            },
        };
        let desc = match query.get("order").map(String::as_str) {
            None | Some("desc") => true,
            Some("asc") => false,
            Some(other) => {
                return Err(ApiError::bad(
                    "order",
                    format!("`order` must be \"asc\" or \"desc\", not {other:?}"),
                ))
            }
        };
        Ok(Self {
            limit,
            desc,
            after: query.get("after").cloned(),
            before: query.get("before").cloned(),
        })
    }

    /// The page of `items` (in the order they were given).
    pub fn of(&self, mut items: Vec<Item>) -> Result<ItemList, ApiError> {
        if self.desc {
            items.reverse();
        }
        let find = |id: &Option<String>, param: &'static str| -> Result<Option<usize>, ApiError> {
            id.as_ref()
                .map(|id| {
                    items.iter().position(|i| i.id() == id).ok_or_else(|| {
                        ApiError::bad(param, format!("no input item {id:?} in this response"))
                    })
                })
                .transpose()
        };
        let start = find(&self.after, "after")?.map_or(0, |i| i + 1);
        let end = find(&self.before, "before")?
            .unwrap_or(items.len())
            .max(start);
        // `before` alone pages backwards: the `limit` items just before it.
        let backwards = self.before.is_some() && self.after.is_none();
        let (from, to, has_more) = if backwards {
            let from = end.saturating_sub(self.limit).max(start);
            (from, end, from > start)
        } else {
            let to = end.min(start.saturating_add(self.limit));
            (start, to, to < end)
        };
        let data: Vec<Item> = items.into_iter().take(to).skip(from).collect();
        Ok(ItemList {
            object: "list",
            first_id: data.first().map(|i| i.id().to_string()),
            last_id: data.last().map(|i| i.id().to_string()),
            has_more,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failure here is a test failure

    use super::*;
    use crate::responses::wire::CallOutput;

    fn items(n: usize) -> Vec<Item> {
        (0..n)
            .map(|i| Item::FunctionCallOutput {
                id: format!("i{i}"),
                call_id: format!("c{i}"),
                output: CallOutput::Text(String::new()),
                status: "completed".into(),
            })
            .collect()
    }

    fn page(query: &[(&str, &str)]) -> Result<Page, ApiError> {
        let q = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Page::from_query(&q)
    }

    fn ids(list: &ItemList) -> Vec<&str> {
        list.data.iter().map(Item::id).collect()
    }

    #[test]
    fn newest_first_twenty_at_a_time_by_default() {
        let list = page(&[]).unwrap().of(items(25)).unwrap();
        assert_eq!(list.data.len(), 20);
        assert_eq!(ids(&list)[..2], ["i24", "i23"]);
        assert_eq!(list.first_id.as_deref(), Some("i24"));
        assert_eq!(list.last_id.as_deref(), Some("i5"));
        assert!(list.has_more);
        let rest = page(&[("after", "i5")]).unwrap().of(items(25)).unwrap();
        assert_eq!(ids(&rest), ["i4", "i3", "i2", "i1", "i0"]);
        assert!(!rest.has_more);
    }

    #[test]
    fn ascending_pages_walk_the_whole_list() {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q = vec![("order", "asc"), ("limit", "2")];
            if let Some(a) = &after {
                q.push(("after", a.as_str()));
            }
            let list = page(&q).unwrap().of(items(5)).unwrap();
            seen.extend(ids(&list).into_iter().map(str::to_string));
            if !list.has_more {
                break;
            }
            after = list.last_id.clone();
        }
        assert_eq!(seen, ["i0", "i1", "i2", "i3", "i4"]);
    }

    /// `before` alone is the page just before it, as a previous-page link asks.
    #[test]
    fn before_pages_backwards() {
        let list = page(&[("before", "i20"), ("limit", "2")])
            .unwrap()
            .of(items(25))
            .unwrap();
        assert_eq!(ids(&list), ["i22", "i21"]);
        assert!(list.has_more);
        let first = page(&[("before", "i23"), ("limit", "5")])
            .unwrap()
            .of(items(25))
            .unwrap();
        assert_eq!(ids(&first), ["i24"]);
        assert!(!first.has_more);
    }

    #[test]
    fn before_ends_the_page() {
        let list = page(&[("order", "asc"), ("before", "i3")])
            .unwrap()
            .of(items(5))
            .unwrap();
        assert_eq!(ids(&list), ["i0", "i1", "i2"]);
        assert!(!list.has_more);
        let list = page(&[("order", "asc"), ("after", "i3"), ("before", "i1")])
            .unwrap()
            .of(items(5))
            .unwrap();
        assert!(list.data.is_empty() && !list.has_more);
    }

    #[test]
    fn bad_parameters_are_named() {
        let param = |q: &[(&str, &str)]| match page(q).and_then(|p| p.of(items(3))) {
            Err(ApiError::BadRequest { param, .. }) => param,
            other => panic!("{q:?}: {:?}", other.map(|l| l.data.len())),
        };
        assert_eq!(param(&[("limit", "0")]), Some("limit"));
        assert_eq!(param(&[("limit", "101")]), Some("limit"));
        assert_eq!(param(&[("limit", "x")]), Some("limit"));
        assert_eq!(param(&[("order", "bogus")]), Some("order"));
        assert_eq!(param(&[("after", "nope")]), Some("after"));
        assert_eq!(param(&[("before", "nope")]), Some("before"));
    }
}
