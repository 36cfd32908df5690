//! The bank-consortium sample: banks are members, account holders are users. A bank opens
//! accounts for users and deposits into them; a user sees the balances of their own accounts and
//! transfers from them. Every transfer carries an application claim, "`<from> sent <value> to
//! <to>; salt <32 hex digits>`", whose SHA-256 the transaction's receipt proves, so a user can
//! show offline, with the receipt and the service identity's certificate alone, that the
//! transfer happened. The salt is 16 random bytes, and only the sender is told the claim: any
//! caller may fetch any transaction's receipt, and the user ids are public, so an unsalted
//! claim's digest gave away who paid whom and how much to anyone who hashed the guesses.
//!
//! Endpoints (under `/app`):
//! - `PUT /account/{user_id}/{account_name}` (members): opens an account with balance 0; 204, and
//!   204 again for an account that is already open; 404 for a user the service does not know.
//! - `POST /deposit/{user_id}/{account_name}` with `{"value": N}` (members): N an integer in
//!   `1..=`[`VALUE_MAX`]; 404 for an unknown user or account; 204.
//! - `GET /balance/{account_name}` (users): `{"balance": N}` for the caller's own account; 404
//!   when the caller has no such account.
//! - `POST /transfer/{account_name}` with `{"value", "user_id_to", "account_name_to"}` (users):
//!   from the caller's own account; 200 with `{"claim", "claims_digest"}`; 400 when the balance is
//!   short, the value is not a positive integer, or the target is the source; 404 when the source
//!   or the target account does not exist, or the target's holder is no longer a user (money
//!   sent there could never be spent).
//!
//! Users and accounts are named by the caller id (hex SHA-256 of the client certificate) the
//! service gives them. Balances are private (sealed); nothing here is public. No answer depends on
//! the balance of an account the caller does not hold: a balance is never too large to be
//! credited (see [`Balance`]), so a bank's deposit or a user's transfer never probes one.

use cloister_sdk::{Auth, Error, Map, Mode, Request, Response, Router, export};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The largest amount one deposit or transfer moves: JSON numbers are exact up to 2^53.
pub const VALUE_MAX: u64 = (1 << 53) - 1;

/// A balance. Wide enough that no credit is ever refused: more than 2^74 deposits of
/// [`VALUE_MAX`] fit. A refusal at a narrower limit told whoever could credit an account
/// (a bank depositing, a user paying in) how close its balance was to the limit, and by asking
/// again with other amounts, the balance. Past 2^53 a balance is exact in the JSON text, which a
/// client that reads numbers as doubles rounds.
pub type Balance = u128;
/// Longest account name, in bytes.
pub const ACCOUNT_NAME_BYTES_MAX: usize = 64;

/// Balances by (user id, account name). Private (sealed). A balance stored as a `u64` by an
/// earlier version reads as the same [`Balance`] (both are JSON numbers).
const ACCOUNTS: Map<(String, String), Balance> = Map::new("accounts");
/// The service's users, by id: readable by apps, written by governance (`set_user`).
const USERS: Map<String, serde_json::Value> = Map::new("gov.users");

pub fn router() -> Router {
    Router::new()
        .route("PUT", "/account/{user_id}/{account_name}", Mode::Readwrite, Auth::Members, open_account)
        .route("POST", "/deposit/{user_id}/{account_name}", Mode::Readwrite, Auth::Members, deposit)
        .route("GET", "/balance/{account_name}", Mode::Readonly, Auth::Users, balance)
        .route("POST", "/transfer/{account_name}", Mode::Readwrite, Auth::Users, transfer)
}

export!(router);

/// Random bytes in a transfer's claim.
pub const CLAIM_SALT_BYTES: usize = 16;

/// The claim a transfer carries, and what its receipt proves: its SHA-256.
pub fn transfer_claim(from: &str, value: u64, to: &str, salt: &[u8; CLAIM_SALT_BYTES]) -> String {
    format!("{from} sent {value} to {to}; salt {}", hex::encode(salt))
}

/// The digest a receipt proves for a claim: SHA-256 of its UTF-8 bytes.
pub fn claims_digest(claim: &str) -> [u8; 32] {
    Sha256::digest(claim.as_bytes()).into()
}

fn account_name(req: &Request, param: &str) -> Result<String, Error> {
    checked_account_name(req.param(param).unwrap_or_default())
}

fn checked_account_name(name: &str) -> Result<String, Error> {
    if name.is_empty() || name.len() > ACCOUNT_NAME_BYTES_MAX {
        return Err(Error::bad_request(format!("an account name is 1..={ACCOUNT_NAME_BYTES_MAX} bytes")));
    }
    Ok(name.to_owned())
}

/// Bytes of a user id: hex SHA-256 of the user's certificate.
const USER_ID_BYTES: usize = 64;

fn known_user(user_id: &str) -> Result<(), Error> {
    // Longer is no user's id; looked up, a key past the store's limit trapped (500).
    if user_id.len() > USER_ID_BYTES || USERS.get(&user_id.to_owned()).is_none() {
        return Err(Error::not_found(format!("user {user_id} is not a user of this service")));
    }
    Ok(())
}

/// A positive integer `value` from a JSON body; anything else (a float, a string, zero, a
/// negative number, a number past [`VALUE_MAX`]) is 400.
fn positive_value(value: &serde_json::Value) -> Result<u64, Error> {
    value
        .as_u64()
        .filter(|v| (1..=VALUE_MAX).contains(v))
        .ok_or_else(|| Error::bad_request(format!("value must be an integer in 1..={VALUE_MAX}, got {value}")))
}

fn open_account(req: &Request) -> Result<Response, Error> {
    let user_id = req.param("user_id").unwrap_or_default().to_owned();
    let name = account_name(req, "account_name")?;
    known_user(&user_id)?;
    let key = (user_id, name);
    if ACCOUNTS.get(&key).is_none() {
        ACCOUNTS.insert(&key, &0);
    }
    Ok(Response::status(204))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deposit {
    value: serde_json::Value,
}

fn deposit(req: &Request) -> Result<Response, Error> {
    let user_id = req.param("user_id").unwrap_or_default().to_owned();
    let name = account_name(req, "account_name")?;
    let body: Deposit = req.json()?;
    let value = positive_value(&body.value)?;
    known_user(&user_id)?;
    let key = (user_id, name);
    let balance = ACCOUNTS.get(&key).ok_or_else(|| Error::not_found("no such account"))?;
    ACCOUNTS.insert(&key, &credit(balance, value)?);
    Ok(Response::status(204))
}

/// `balance + value`. It cannot overflow (see [`Balance`]); were it to, the request fails as
/// the service's fault (500), the same for every caller, and changes nothing.
fn credit(balance: Balance, value: u64) -> Result<Balance, Error> {
    balance.checked_add(Balance::from(value)).ok_or_else(|| Error::internal("a balance overflowed"))
}

#[derive(Serialize)]
struct BalanceReply {
    balance: Balance,
}

fn balance(req: &Request) -> Result<Response, Error> {
    let name = account_name(req, "account_name")?;
    let balance =
        ACCOUNTS.get(&(req.caller().id.clone(), name)).ok_or_else(|| Error::not_found("you have no such account"))?;
    Ok(Response::json(&BalanceReply { balance }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Transfer {
    value: serde_json::Value,
    user_id_to: String,
    account_name_to: String,
}

fn transfer(req: &Request) -> Result<Response, Error> {
    let name = account_name(req, "account_name")?;
    let body: Transfer = req.json()?;
    let value = positive_value(&body.value)?;
    let from = (req.caller().id.clone(), name);
    let to = (body.user_id_to, checked_account_name(&body.account_name_to)?);
    if from == to {
        return Err(Error::bad_request("an account cannot transfer to itself"));
    }
    // The sender's own standing first: a transfer it cannot pay for says nothing of the target
    // (whether that account exists), however it is addressed.
    let from_balance = ACCOUNTS.get(&from).ok_or_else(|| Error::not_found("you have no such account"))?;
    let remaining = from_balance
        .checked_sub(Balance::from(value))
        .ok_or_else(|| Error::bad_request(format!("the balance ({from_balance}) is less than {value}")))?;
    known_user(&to.0)?;
    let to_balance = ACCOUNTS.get(&to).ok_or_else(|| Error::not_found("the target account does not exist"))?;
    let credited = credit(to_balance, value)?;
    ACCOUNTS.insert(&from, &remaining);
    ACCOUNTS.insert(&to, &credited);
    let mut salt = [0u8; CLAIM_SALT_BYTES];
    getrandom::fill(&mut salt).map_err(|e| Error::internal(format!("no randomness for the claim's salt: {e}")))?;
    let claim = transfer_claim(&from.0, value, &to.0, &salt);
    let digest = claims_digest(&claim);
    Ok(Response::json(&json!({ "claim": claim, "claims_digest": hex::encode(digest) })).with_claims_digest(digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_sdk::Caller;
    use cloister_sdk::testing::MemoryHost;
    use serde_json::Value;

    const BANK: &str = "bank0";
    const ALICE: &str = "a11ce";
    const BOB: &str = "b0b";

    fn host() -> MemoryHost {
        let mut h = MemoryHost::new(router());
        for user in [ALICE, BOB] {
            h.seed("gov.users", &user.to_owned(), &json!({ "cert": "…" }));
        }
        h
    }

    fn call(h: &mut MemoryHost, who: &Caller, method: &str, target: &str, body: Value) -> (u16, Value) {
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let r = h.call(who, method, target, body);
        (r.head.status, r.body_json().unwrap_or(Value::Null))
    }

    fn bank() -> Caller {
        Caller::member(BANK)
    }

    fn funded(h: &mut MemoryHost) {
        for user in [ALICE, BOB] {
            assert_eq!(call(h, &bank(), "PUT", &format!("/account/{user}/current"), Value::Null).0, 204);
        }
        assert_eq!(call(h, &bank(), "POST", &format!("/deposit/{ALICE}/current"), json!({"value": 100})).0, 204);
    }

    fn balance_of(h: &mut MemoryHost, user: &str) -> u64 {
        let (status, body) = call(h, &Caller::user(user), "GET", "/balance/current", Value::Null);
        assert_eq!(status, 200, "{body}");
        body["balance"].as_u64().unwrap()
    }

    #[test]
    fn the_demo_moves_money_and_claims_it() {
        let mut h = host();
        funded(&mut h);
        // Opening again is a no-op that keeps the balance.
        assert_eq!(call(&mut h, &bank(), "PUT", &format!("/account/{ALICE}/current"), Value::Null).0, 204);
        assert_eq!(balance_of(&mut h, ALICE), 100);
        let r = h.call(
            &Caller::user(ALICE),
            "POST",
            "/transfer/current",
            json!({"value": 40, "user_id_to": BOB, "account_name_to": "current"}).to_string(),
        );
        assert_eq!(r.head.status, 200);
        let claim = r.body_json::<Value>().unwrap()["claim"].as_str().unwrap().to_owned();
        let salt = claim.strip_prefix(&format!("{ALICE} sent 40 to {BOB}; salt ")).expect("who, how much, to whom");
        assert!(salt.len() == 2 * CLAIM_SALT_BYTES && hex::decode(salt).is_ok(), "{claim}");
        let digest = hex::encode(Sha256::digest(claim.as_bytes()));
        assert_eq!(r.head.claims_digest.as_deref(), Some(digest.as_str()), "the receipt will prove the claim");
        assert_eq!((balance_of(&mut h, ALICE), balance_of(&mut h, BOB)), (60, 40));
    }

    /// Anyone may fetch any transaction's receipt, and user ids are public: a claims digest over
    /// "who sent how much to whom" alone was found by hashing the guesses, so every receipt told
    /// its transfer to every caller. The salt makes two equal transfers' digests differ and
    /// neither the digest of the guess.
    #[test]
    fn a_claims_digest_is_not_found_by_guessing_the_transfer() {
        let mut h = host();
        funded(&mut h);
        let digests: Vec<String> = (0..2)
            .map(|_| {
                let body = json!({"value": 10, "user_id_to": BOB, "account_name_to": "current"});
                let r = h.call(&Caller::user(ALICE), "POST", "/transfer/current", body.to_string());
                assert_eq!(r.head.status, 200);
                r.head.claims_digest.unwrap()
            })
            .collect();
        assert_ne!(digests[0], digests[1], "two equal transfers");
        let guess = hex::encode(Sha256::digest(format!("{ALICE} sent 10 to {BOB}").as_bytes()));
        assert!(!digests.contains(&guess), "the digest of the guess");
    }

    /// A removed user's accounts stay, and nobody can spend from them: a transfer there is
    /// refused (it answered 200 and the money was gone for good).
    #[test]
    fn a_transfer_to_a_user_no_longer_in_the_service_is_refused() {
        let mut h = host();
        funded(&mut h);
        h.remove("gov.users", &BOB.to_owned());
        let before = h.dump();
        let body = json!({"value": 10, "user_id_to": BOB, "account_name_to": "current"});
        let (status, answer) = call(&mut h, &Caller::user(ALICE), "POST", "/transfer/current", body);
        assert_eq!(status, 404, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("not a user"), "{answer}");
        assert_eq!(h.dump(), before, "nothing moved");
    }

    #[test]
    fn bad_amounts_and_unknown_parties_are_refused_and_change_nothing() {
        let mut h = host();
        funded(&mut h);
        let before = h.dump();
        let alice = Caller::user(ALICE);
        let deposit = |v: Value| json!({ "value": v });
        for bad in [json!(0), json!(-5), json!(1.5), json!("10"), json!(VALUE_MAX + 1), Value::Null] {
            let (status, _) = call(&mut h, &bank(), "POST", &format!("/deposit/{ALICE}/current"), deposit(bad.clone()));
            assert_eq!(status, 400, "deposit {bad}");
            let body = json!({"value": bad, "user_id_to": BOB, "account_name_to": "current"});
            assert_eq!(call(&mut h, &alice, "POST", "/transfer/current", body).0, 400, "transfer {bad}");
        }
        // More than the balance; to itself; a malformed body.
        let body = json!({"value": 101, "user_id_to": BOB, "account_name_to": "current"});
        let (status, answer) = call(&mut h, &alice, "POST", "/transfer/current", body);
        assert_eq!(status, 400);
        assert!(answer["error"]["message"].as_str().unwrap().contains("less than 101"), "{answer}");
        let body = json!({"value": 1, "user_id_to": ALICE, "account_name_to": "current"});
        assert_eq!(call(&mut h, &alice, "POST", "/transfer/current", body).0, 400);
        assert_eq!(h.call(&alice, "POST", "/transfer/current", "{").head.status, 400);
        // Unknown users, accounts and targets.
        assert_eq!(call(&mut h, &bank(), "PUT", "/account/nobody/current", Value::Null).0, 404);
        assert_eq!(call(&mut h, &bank(), "POST", "/deposit/nobody/current", deposit(json!(1))).0, 404);
        assert_eq!(call(&mut h, &bank(), "POST", &format!("/deposit/{BOB}/savings"), deposit(json!(1))).0, 404);
        let body = json!({"value": 1, "user_id_to": BOB, "account_name_to": "savings"});
        assert_eq!(call(&mut h, &alice, "POST", "/transfer/current", body).0, 404);
        let body = json!({"value": 1, "user_id_to": BOB, "account_name_to": "current"});
        assert_eq!(call(&mut h, &alice, "POST", "/transfer/savings", body).0, 404);
        assert_eq!(h.dump(), before, "no refused request wrote anything");
    }

    /// A user with nothing to send learned, for free, whether any user's account existed: the
    /// target was looked up before the sender's balance. And a target past the store's key limit
    /// trapped the contract (500) where it is no account (400, 404).
    #[test]
    fn a_transfer_nobody_can_pay_for_says_nothing_of_its_target() {
        let mut h = host();
        funded(&mut h);
        let before = h.dump();
        let bob = Caller::user(BOB);
        let to = |user: &str, account: &str| json!({"value": 1, "user_id_to": user, "account_name_to": account});
        let existing = call(&mut h, &bob, "POST", "/transfer/current", to(ALICE, "current"));
        let missing = call(&mut h, &bob, "POST", "/transfer/current", to(ALICE, "savings"));
        assert_eq!(existing.0, 400, "{}", existing.1);
        assert_eq!(existing, missing);
        let long = "a".repeat(5000);
        let alice = Caller::user(ALICE);
        assert_eq!(call(&mut h, &alice, "POST", "/transfer/current", to(&long, "current")).0, 404);
        assert_eq!(call(&mut h, &alice, "POST", "/transfer/current", to(BOB, &long)).0, 400);
        assert_eq!(call(&mut h, &bank(), "PUT", &format!("/account/{long}/current"), Value::Null).0, 404);
        assert_eq!(h.dump(), before, "nothing was written");
    }

    /// Whoever can credit an account (a bank depositing into any, a user paying into any) was
    /// told, by a refusal at the largest balance, how close that account's balance was to it,
    /// and by asking again with other amounts, the balance. Two services that differ only in
    /// Alice's balance now answer a bank's and another user's every request alike.
    #[test]
    fn no_answer_tells_a_balance_to_anyone_but_its_holder() {
        const LARGEST: u64 = (1 << 53) - 1;
        const MALLORY: &str = "ma11ory";
        let answers = |alice: u64| {
            let mut h = host();
            h.seed("gov.users", &MALLORY.to_owned(), &json!({ "cert": "…" }));
            for user in [ALICE, MALLORY] {
                assert_eq!(call(&mut h, &bank(), "PUT", &format!("/account/{user}/current"), Value::Null).0, 204);
            }
            let fund = |h: &mut MemoryHost, user: &str, value: u64| {
                let (status, body) =
                    call(h, &bank(), "POST", &format!("/deposit/{user}/current"), json!({ "value": value }));
                assert_eq!(status, 204, "{body}");
            };
            fund(&mut h, ALICE, alice);
            fund(&mut h, MALLORY, LARGEST);
            let mut seen = Vec::new();
            let pay = json!({"value": 100, "user_id_to": ALICE, "account_name_to": "current"});
            let (status, mut paid) = call(&mut h, &Caller::user(MALLORY), "POST", "/transfer/current", pay);
            // The claim is salted at random: the status and any error are compared.
            if let Some(reply) = paid.as_object_mut() {
                reply.remove("claim");
                reply.remove("claims_digest");
            }
            seen.push((status, paid));
            for value in [LARGEST - 1000, 1] {
                let deposit = json!({ "value": value });
                seen.push(call(&mut h, &bank(), "POST", &format!("/deposit/{ALICE}/current"), deposit));
            }
            seen
        };
        let (low, high) = (answers(1), answers(LARGEST - 10));
        for (i, (l, h)) in low.iter().zip(&high).enumerate() {
            assert_eq!(l, h, "request {i} answered differently with Alice's balance low and high");
        }
    }

    #[test]
    fn a_balance_grows_past_the_largest_amount_and_reads_back_exactly() {
        let mut h = host();
        funded(&mut h);
        let top = json!({ "value": VALUE_MAX });
        for _ in 0..3 {
            assert_eq!(call(&mut h, &bank(), "POST", &format!("/deposit/{ALICE}/current"), top.clone()).0, 204);
        }
        assert_eq!(balance_of(&mut h, ALICE), 100 + 3 * VALUE_MAX);
        assert_eq!(call(&mut h, &bank(), "POST", &format!("/deposit/{BOB}/current"), top).0, 204);
        let body = json!({"value": VALUE_MAX, "user_id_to": ALICE, "account_name_to": "current"});
        assert_eq!(call(&mut h, &Caller::user(BOB), "POST", "/transfer/current", body).0, 200);
        assert_eq!((balance_of(&mut h, ALICE), balance_of(&mut h, BOB)), (100 + 4 * VALUE_MAX, 0));
        // More than one request may move is refused, and a sum past a u64 still credits.
        let body = json!({"value": 4 * VALUE_MAX, "user_id_to": BOB, "account_name_to": "current"});
        assert_eq!(call(&mut h, &Caller::user(ALICE), "POST", "/transfer/current", body).0, 400);
        assert_eq!(credit(Balance::from(u64::MAX), VALUE_MAX).unwrap(), u128::from(u64::MAX) + u128::from(VALUE_MAX));
        assert_eq!(credit(Balance::MAX, 1).unwrap_err().status, 500);
    }

    #[test]
    fn account_names_are_limited_at_their_edge() {
        let mut h = host();
        let longest = "n".repeat(ACCOUNT_NAME_BYTES_MAX);
        assert_eq!(call(&mut h, &bank(), "PUT", &format!("/account/{ALICE}/{longest}"), Value::Null).0, 204);
        let (status, body) = call(&mut h, &bank(), "PUT", &format!("/account/{ALICE}/{longest}n"), Value::Null);
        assert_eq!(status, 400);
        assert!(body["error"]["message"].as_str().unwrap().contains("account name"), "{body}");
        let (status, _) = call(&mut h, &Caller::user(ALICE), "GET", &format!("/balance/{longest}"), Value::Null);
        assert_eq!(status, 200);
    }

    #[test]
    fn only_holders_see_balances_and_roles_are_kept() {
        let mut h = host();
        funded(&mut h);
        // Bob has no "savings"; Alice's "current" is hers alone: both answer alike, so an error
        // never tells whether someone else's account exists.
        let mine = h.call(&Caller::user(BOB), "GET", "/balance/savings", "");
        let others = h.call(&Caller::user("mallory"), "GET", "/balance/current", "");
        assert_eq!(mine.head.status, 404);
        assert_eq!((mine.head, mine.body), (others.head, others.body));
        // Banks do not transfer or read balances; users do not open accounts or deposit.
        let transfer = json!({"value": 1, "user_id_to": BOB, "account_name_to": "current"});
        assert_eq!(call(&mut h, &bank(), "POST", "/transfer/current", transfer).0, 403);
        assert_eq!(call(&mut h, &bank(), "GET", "/balance/current", Value::Null).0, 403);
        let alice = Caller::user(ALICE);
        assert_eq!(call(&mut h, &alice, "PUT", &format!("/account/{ALICE}/other"), Value::Null).0, 403);
        assert_eq!(call(&mut h, &alice, "POST", &format!("/deposit/{ALICE}/current"), json!({"value": 5})).0, 403);
        assert_eq!(balance_of(&mut h, ALICE), 100);
    }
}

/// Property test: any sequence of transfers among the accounts conserves the total, and each
/// either moves exactly its value or changes nothing.
#[cfg(test)]
mod fuzz {
    use cloister_sdk::Caller;
    use cloister_sdk::testing::MemoryHost;
    use cloister_test_support::config;
    use cloister_test_support::proptest::prelude::*;
    use serde_json::{Value, json};

    use super::router;

    const USERS: [&str; 3] = ["u0", "u1", "u2"];

    fn balances(h: &mut MemoryHost) -> Vec<u64> {
        USERS
            .iter()
            .map(|u| {
                h.call(&Caller::user(*u), "GET", "/balance/a", "").body_json::<Value>().unwrap()["balance"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn transfers_conserve_money(moves in prop::collection::vec((0..3usize, 0..3usize, -5i64..80), 0..40)) {
            let mut h = MemoryHost::new(router());
            let bank = Caller::member("bank");
            for (i, u) in USERS.iter().enumerate() {
                h.seed("gov.users", &u.to_string(), &json!({}));
                h.call(&bank, "PUT", &format!("/account/{u}/a"), "");
                h.call(&bank, "POST", &format!("/deposit/{u}/a"), json!({"value": 50 * (i + 1)}).to_string());
            }
            let total: u64 = balances(&mut h).iter().sum();
            for (from, to, value) in moves {
                let before = balances(&mut h);
                let body = json!({"value": value, "user_id_to": USERS[to], "account_name_to": "a"}).to_string();
                let status = h.call(&Caller::user(USERS[from]), "POST", "/transfer/a", body).head.status;
                let after = balances(&mut h);
                prop_assert_eq!(after.iter().sum::<u64>(), total);
                if status == 200 {
                    prop_assert_eq!(after[from] + value as u64, before[from]);
                    prop_assert_eq!(after[to], before[to] + value as u64);
                } else {
                    prop_assert!(status == 400, "answered {}", status);
                    prop_assert_eq!(after, before);
                }
            }
        }
    }
}
