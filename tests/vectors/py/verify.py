#!/usr/bin/env python3
"""Independent verifier of Warden lease bundles, written from docs/attestation.md alone.

Usage:
    python3 verify.py VECTOR.json      # run one vector, print {"holds", "failures"}
    python3 verify.py --all DIR        # run every *.json in DIR, compare with "expected"

Only the Python standard library and the `cryptography` package (Ed25519) are used.
Section names in the comments ("§ Verification", "step 3", ...) refer to docs/attestation.md.
Places where the document left a choice open are marked "GUESS:".
"""

import base64
import binascii
import hashlib
import json
import os
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# --------------------------------------------------------------------------------------------
# Constants (§ Payload types, § Verification)
# --------------------------------------------------------------------------------------------

TYPE_RECORD = "application/vnd.warden.record.v1+protobuf"
TYPE_RECEIPT = "application/vnd.warden.receipt.v1+protobuf"
TYPE_RECEIPTS = "application/vnd.warden.receipts.v1+protobuf"
TYPE_CHALLENGE = "application/vnd.warden.challenge.v1+protobuf"
TYPE_VERDICT = "application/vnd.warden.verdict.v1+protobuf"

MAX_PAYLOAD = 4 * 1024 * 1024  # 4,194,304 bytes
ZERO32 = bytes(32)
HOLDER_VERDICTS = {"lease-container", "agent", "allowlisted", "foreign"}
GUARD_MODES = {"", "open", "scan"}
BUNDLE_FORMAT = "warden.lease-bundle.v2"


# --------------------------------------------------------------------------------------------
# Keys and key ids (§ Keys and key ids)
# --------------------------------------------------------------------------------------------

def key_id(public_key: bytes) -> str:
    """Lower-case hex of the first 16 bytes of SHA-256 over the raw 32-byte public key."""
    return hashlib.sha256(public_key).digest()[:16].hex()


def parse_public_key(text):
    """A public key as written in configuration: standard base64 with padding (44 characters)
    or 64 hex digits (either case). Returns the raw 32 bytes, or None if it is not a key."""
    if not isinstance(text, str):
        return None
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    if len(text) == 44:
        raw = b64decode_strict(text)
        if raw is not None and len(raw) == 32:
            return raw
    return None


# --------------------------------------------------------------------------------------------
# Base64 as the document defines it (§ Envelopes)
# --------------------------------------------------------------------------------------------

_B64_ALPHABET = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def b64decode_strict(text):
    """Standard alphabet, `=` padding required, no whitespace; the unused low bits of the last
    character are ignored. Returns bytes, or None if the text is not such base64."""
    if not isinstance(text, str) or len(text) % 4 != 0:
        return None
    body = text.rstrip("=")
    pad = len(text) - len(body)
    if pad > 2 or any(c not in _B64_ALPHABET for c in body):
        return None
    # A 4-character group that is all padding, or one data character followed by '==' ... is
    # impossible once len%4==0 and pad<=2, except "x===" which pad>2 already rejects.
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Envelopes in their JSON form (§ Envelopes)
# --------------------------------------------------------------------------------------------

class Envelope:
    def __init__(self, payload_type, payload, signatures):
        self.payload_type = payload_type  # str
        self.payload = payload  # bytes
        self.signatures = signatures  # list of (keyid: str, sig: bytes)


class MalformedEnvelope(Exception):
    """JSON that is not an envelope (a "malformed" item of the bundle)."""


def parse_envelope_json(obj):
    """Read a DSSE JSON envelope. All three top-level fields and both signature fields are
    required and must be strings (signatures: an array); bytes are base64. Raises
    MalformedEnvelope naming the field."""
    if not isinstance(obj, dict):
        raise MalformedEnvelope("envelope JSON: not an object")
    for field in ("payloadType", "payload"):
        if not isinstance(obj.get(field), str):
            raise MalformedEnvelope(f"envelope JSON: missing or non-string field `{field}`")
    if not isinstance(obj.get("signatures"), list):
        raise MalformedEnvelope("envelope JSON: missing array field `signatures`")
    payload = b64decode_strict(obj["payload"])
    if payload is None:
        raise MalformedEnvelope("envelope JSON: field `payload` is not base64")
    sigs = []
    for s in obj["signatures"]:
        if not isinstance(s, dict):
            raise MalformedEnvelope("envelope JSON: a signature is not an object")
        for field in ("keyid", "sig"):
            if not isinstance(s.get(field), str):
                raise MalformedEnvelope(f"envelope JSON: missing or non-string field `{field}`")
        sig = b64decode_strict(s["sig"])
        if sig is None:
            raise MalformedEnvelope("envelope JSON: field `sig` is not base64")
        sigs.append((s["keyid"], sig))
    return Envelope(obj["payloadType"], payload, sigs)


def digest(env: Envelope) -> bytes:
    """§ What is hashed: SHA-256 over the envelope's payload bytes exactly as signed."""
    return hashlib.sha256(env.payload).digest()


# --------------------------------------------------------------------------------------------
# Pre-authentication encoding (§ Pre-authentication encoding)
# --------------------------------------------------------------------------------------------

def pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


# --------------------------------------------------------------------------------------------
# Protobuf wire-format decoder (field numbers from § Payload types and § Attestation records)
# --------------------------------------------------------------------------------------------

class DecodeError(Exception):
    pass


def read_varint(buf: bytes, pos: int):
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        if shift == 63 and b > 1:
            raise DecodeError("varint overflows 64 bits")
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def iter_fields(buf: bytes):
    """Yield (field_number, wire_type, value) where value is an int (varint), bytes (fixed64,
    fixed32, length-delimited) or None (a skipped group)."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise DecodeError("field number 0")
        if wt == 0:
            value, pos = read_varint(buf, pos)
        elif wt == 1:
            if pos + 8 > len(buf):
                raise DecodeError("truncated fixed64")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            n, pos = read_varint(buf, pos)
            if pos + n > len(buf):
                raise DecodeError("truncated length-delimited field")
            value, pos = buf[pos:pos + n], pos + n
        elif wt == 5:
            if pos + 4 > len(buf):
                raise DecodeError("truncated fixed32")
            value, pos = buf[pos:pos + 4], pos + 4
        elif wt == 3:
            # GUESS: the document only says "unknown fields skipped"; a (deprecated) group is
            # skipped to its matching end-group tag.
            pos = skip_group(buf, pos, field)
            value = None
        else:
            raise DecodeError(f"unexpected wire type {wt}")
        yield field, wt, value


def skip_group(buf, pos, field):
    depth = 1
    while depth:
        if pos >= len(buf):
            raise DecodeError("truncated group")
        key, pos = read_varint(buf, pos)
        f, wt = key >> 3, key & 7
        if wt == 0:
            _, pos = read_varint(buf, pos)
        elif wt == 1:
            pos += 8
        elif wt == 2:
            n, pos = read_varint(buf, pos)
            pos += n
        elif wt == 5:
            pos += 4
        elif wt == 3:
            depth += 1
        elif wt == 4:
            depth -= 1
        else:
            raise DecodeError(f"unexpected wire type {wt}")
        if pos > len(buf):
            raise DecodeError("truncated group")
    return pos


# Scalar kinds: (wire type, converter)
def _int64(v):
    return v - (1 << 64) if v >= (1 << 63) else v


def _uint32(v):
    # GUESS: a uint32 read from a varint wider than 32 bits keeps its low 32 bits (usual
    # protobuf behaviour); the document does not say.
    return v & 0xFFFFFFFF


def _string(v):
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        # GUESS: a proto3 string must be valid UTF-8, otherwise the message does not decode.
        raise DecodeError("invalid UTF-8 in a string field")


SCALARS = {
    "string": (2, _string, ""),
    "bytes": (2, bytes, b""),
    "uint64": (0, lambda v: v, 0),
    "int64": (0, _int64, 0),
    "uint32": (0, _uint32, 0),
    "bool": (0, lambda v: v != 0, False),
    "double": (1, lambda v: struct.unpack("<d", v)[0], 0.0),
}


def decode_message(buf: bytes, schema: dict) -> dict:
    """Decode `buf` with `schema`: {field number: (name, kind, repeated)}, where kind is a scalar
    name or a nested schema (dict). Unknown fields are skipped. Returns a dict of names; the
    special key "_oneof" holds the field number of the last one-of member seen (for `Record`).
    A known field with the wrong wire type is a decode error (GUESS: not stated in the document).
    Non-repeated embedded messages that occur twice are merged, as protobuf does."""
    out = {}
    raw_messages = {}  # name -> list of chunks, for merging embedded messages
    oneof = schema.get("_oneof", ())
    for field, wt, value in iter_fields(buf):
        spec = schema.get(field)
        if spec is None:
            continue  # unknown field: skipped
        name, kind, repeated = spec
        if isinstance(kind, dict):
            if wt != 2:
                raise DecodeError(f"field {name}: wrong wire type {wt}")
            if repeated:
                out.setdefault(name, []).append(decode_message(value, kind))
            else:
                if field in oneof and out.get("_oneof") != field:
                    # switching one-of member: the previous member is cleared
                    for f in oneof:
                        raw_messages.pop(schema[f][0], None)
                raw_messages.setdefault(name, []).append(value)
            if field in oneof:
                out["_oneof"] = field
        else:
            want_wt, conv, _ = SCALARS[kind]
            if wt != want_wt:
                raise DecodeError(f"field {name}: wrong wire type {wt}")
            if repeated:
                out.setdefault(name, []).append(conv(value))
            else:
                out[name] = conv(value)
    for name, chunks in raw_messages.items():
        kind = next(spec[1] for f, spec in schema.items() if f != "_oneof" and spec[0] == name)
        out[name] = decode_message(b"".join(chunks), kind)
    # proto3 defaults for absent fields
    for f, spec in schema.items():
        if f == "_oneof":
            continue
        name, kind, repeated = spec
        if name not in out:
            if repeated:
                out[name] = []
            elif isinstance(kind, dict):
                out[name] = None
            else:
                out[name] = SCALARS[kind][2]
    out.setdefault("_oneof", None)
    return out


def S(name, kind, repeated=False):
    return (name, kind, repeated)


INVENTORY_SUMMARY = {1: S("hostname", "string"), 2: S("os", "string"), 3: S("kernel", "string"),
                     4: S("cpu_cores", "uint32"), 5: S("memory_bytes", "uint64"),
                     6: S("gpu_count", "uint32")}
SPOOL_STATE = {1: S("pending", "uint64"), 2: S("bytes", "uint64"), 3: S("max_bytes", "uint64"),
               4: S("full", "bool"), 5: S("refused", "uint64")}
HOST_SAMPLE = {1: S("load1", "double"), 2: S("mem_total_bytes", "uint64"),
               3: S("mem_available_bytes", "uint64"), 4: S("uptime_s", "uint64")}
TELEMETRY = {1: S("host", HOST_SAMPLE), 2: S("spool", SPOOL_STATE)}
# CommandResult's fields are not given in attestation.md; an empty schema skips them all.
COMMAND_RESULT = {}
GPU_WINDOW = {1: S("uuid", "string"), 2: S("samples", "uint32"), 3: S("util_min", "uint32"),
              4: S("util_mean", "double"), 5: S("util_max", "uint32"),
              6: S("memory_used_min_bytes", "uint64"), 7: S("memory_used_mean_bytes", "double"),
              8: S("memory_used_max_bytes", "uint64")}
HOLDER_SEEN = {1: S("pid", "uint32"), 2: S("exe", "string"), 3: S("container", "string"),
               4: S("gpu", "string"), 5: S("verdict", "string")}
ENFORCEMENT_EVENT = {1: S("pid", "uint32"), 2: S("exe", "string"), 3: S("container", "string"),
                     4: S("gpu", "string"), 5: S("action", "string"), 6: S("outcome", "string"),
                     7: S("detected_unix_ms", "int64"), 8: S("sigterm_unix_ms", "int64"),
                     9: S("sigkill_unix_ms", "int64"), 10: S("done_unix_ms", "int64")}
PREVENTED_OPEN = {1: S("pid", "uint32"), 2: S("exe", "string"), 3: S("container", "string"),
                  4: S("gpu", "string"), 5: S("device", "string"), 6: S("attempts", "uint64"),
                  7: S("first_unix_ms", "int64"), 8: S("last_unix_ms", "int64")}
ATTESTATION = {1: S("lease_id", "string"), 2: S("lease_seq", "uint64"),
               3: S("prev_sha256", "bytes"), 4: S("window_start_unix_ms", "int64"),
               5: S("window_end_unix_ms", "int64"), 6: S("sampled_ms", "int64"),
               7: S("gpus", GPU_WINDOW, True), 8: S("holders", HOLDER_SEEN, True),
               9: S("enforcement", ENFORCEMENT_EVENT, True), 10: S("challenges", "bytes", True),
               11: S("blind", "string", True), 12: S("guard", "string"),
               13: S("unguarded", "string"), 14: S("prevented", PREVENTED_OPEN, True),
               15: S("prevented_more", "uint64")}
LEASE_PROOF = {1: S("lease_id", "string"), 2: S("t1_unix_ms", "int64"),
               3: S("t2_unix_ms", "int64"), 4: S("first_seq", "uint64"),
               5: S("last_seq", "uint64"), 6: S("head_sha256", "bytes"),
               7: S("coverage", "double"), 8: S("foreign_events", "uint64"),
               9: S("kills", "uint64"), 10: S("container_stops", "uint64"),
               11: S("restarts", "uint32"), 12: S("prevented", "uint64")}
RECORD = {1: S("node_id", "string"), 2: S("seq", "uint64"), 3: S("time_unix_ms", "int64"),
          4: S("start_id", "string"), 10: S("telemetry", TELEMETRY),
          11: S("inventory", INVENTORY_SUMMARY), 12: S("command_result", COMMAND_RESULT),
          13: S("attestation", ATTESTATION), 14: S("lease_proof", LEASE_PROOF),
          "_oneof": (10, 11, 12, 13, 14)}
RECEIPT = {1: S("node_id", "string"), 2: S("seq", "uint64"), 3: S("payload_sha256", "bytes"),
           4: S("time_unix_ms", "int64"), 5: S("lease_id", "string"), 6: S("lease_seq", "uint64")}
RECEIPTS = {1: S("receipts", RECEIPT, True)}
CHALLENGE = {1: S("node_id", "string"), 2: S("lease_id", "string"), 3: S("nonce", "bytes"),
             4: S("issued_unix_ms", "int64"), 5: S("deadline_unix_ms", "int64"),
             6: S("index", "uint64"), 7: S("prev_sha256", "bytes")}
LEASE_VERDICT = {1: S("lease_id", "string"), 2: S("node_id", "string"), 3: S("holds", "bool"),
                 4: S("reasons", "string", True), 5: S("coverage", "double"),
                 6: S("head_sha256", "bytes"), 7: S("time_unix_ms", "int64"),
                 8: S("t1_unix_ms", "int64"), 9: S("t2_unix_ms", "int64"),
                 10: S("last_seq", "uint64"), 11: S("challenges", "uint64"),
                 12: S("last_challenge_sha256", "bytes"), 13: S("gpus", "string", True)}

SCHEMA_OF_TYPE = {TYPE_RECORD: RECORD, TYPE_RECEIPT: RECEIPT, TYPE_RECEIPTS: RECEIPTS,
                  TYPE_CHALLENGE: CHALLENGE, TYPE_VERDICT: LEASE_VERDICT}


# --------------------------------------------------------------------------------------------
# Envelope verification, steps 1-5 (§ Verification)
# --------------------------------------------------------------------------------------------

class VerifyError(Exception):
    def __init__(self, variant, reason):
        super().__init__(reason)
        self.variant = variant  # WrongPayloadType, TooLarge, NoSignature, UnknownKey, ...
        self.reason = reason


def verify_envelope(env: Envelope, expected_type: str, public_key: bytes):
    """Steps 1-4: raise VerifyError for the first failing step."""
    # 1. payload type
    if env.payload_type != expected_type:
        raise VerifyError("WrongPayloadType",
                          f"payload type is {env.payload_type}, expected {expected_type}")
    # 2. size
    if len(env.payload) > MAX_PAYLOAD:
        raise VerifyError("TooLarge", f"payload of {len(env.payload)} bytes exceeds the "
                                      f"{MAX_PAYLOAD}-byte limit")
    # 3. a signature by the trusted key's key id (the first one that names it)
    kid = key_id(public_key)
    if not env.signatures:
        raise VerifyError("NoSignature", "envelope has no signature")
    chosen = next((sig for k, sig in env.signatures if k == kid), None)
    if chosen is None:
        raise VerifyError("UnknownKey", f"no signature by key {kid}; signed by unknown key "
                                        f"{env.signatures[0][0]}")
    # 4. Ed25519 over PAE(payload_type, payload)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(chosen, pae(env.payload_type,
                                                                          env.payload))
    except (InvalidSignature, ValueError):
        raise VerifyError("BadSignature", f"signature by key {kid} does not verify over the "
                                          f"payload (tampered, or the wrong key)")


def open_envelope(env: Envelope, expected_type: str, public_key: bytes) -> dict:
    """Steps 1-5: verify, then decode the payload as the message its type names."""
    verify_envelope(env, expected_type, public_key)
    try:
        return decode_message(env.payload, SCHEMA_OF_TYPE[expected_type])
    except DecodeError as e:
        raise VerifyError("Decode", f"{expected_type} payload does not decode: {e}")


# Rule for a node-signed envelope that fails (§ Verifying a lease, step 2).
NODE_RULE_OF_VARIANT = {"WrongPayloadType": "bad-payload", "TooLarge": "bad-payload",
                        "Decode": "bad-payload", "NoSignature": "wrong-key",
                        "UnknownKey": "wrong-key", "BadSignature": "bad-signature"}


# --------------------------------------------------------------------------------------------
# Lease verification (§ Verifying a lease)
# --------------------------------------------------------------------------------------------

class Item:
    """One envelope (or malformed entry) of a bundle list."""

    def __init__(self, kind, index, raw):
        self.kind = kind  # "record", "receipt", "challenge", "proof", "verdict"
        self.index = index  # position in its bundle list (0-based)
        self.env = None
        self.malformed = None
        try:
            self.env = parse_envelope_json(raw)
        except MalformedEnvelope as e:
            self.malformed = str(e)
        self.digest = digest(self.env) if self.env is not None else None
        self.verified = False  # signature steps 1-4 passed
        self.msg = None  # decoded message (Record, Receipt, ...)
        self.att = None  # the Attestation, for records whose body is one
        self.valid = False

    def label(self):
        return f"{self.kind} {self.index + 1}"


class Lease:
    """State of one verification run; one method per step of the document."""

    def __init__(self, bundle, trust, params):
        self.bundle = bundle
        self.trust = trust
        self.lease_id = bundle["lease_id"]
        self.max_skew = params.get("max_skew_ms", 5000)
        self.min_coverage = params.get("min_coverage", 0.9)
        self.max_delay = params.get("max_delay_ms", 120000)
        self.now = params["now_unix_ms"]
        self.failures = []
        self.node_key = None
        self.coord_key = None
        self.verdict = None  # decoded LeaseVerdict when valid
        self.proof = None  # decoded LeaseProof when valid
        self.proof_item = None
        self.records = []
        self.members = {}  # lease seq -> Item
        self.span = None  # (t1, t2) or None
        self.receipt_index = {}  # (lease_seq, payload_sha256) -> earliest time
        self.countersigned = {}  # member seq -> receipt time (valid members only)
        self.challenges = []  # valid challenge Items

    def fail(self, rule, detail):
        self.failures.append({"rule": rule, "detail": detail})

    # ---- helpers ---------------------------------------------------------------------------

    def node_id(self):
        return key_id(self.node_key)

    def valid_members(self):
        """Valid members in lease-seq order (what "the valid attestations" means below).
        GUESS: § Derived figures says "the valid attestations"; a valid record that is a
        seq-repeat (not the member at its seq) is not counted."""
        return [self.members[s] for s in sorted(self.members) if self.members[s].valid]

    @staticmethod
    def sampled(att):
        """§ Derived figures: sampled(a)."""
        if att["blind"]:
            return 0
        width = max(0, att["window_end_unix_ms"] - att["window_start_unix_ms"])
        return min(max(att["sampled_ms"], 0), width)

    def coverage(self, atts):
        if self.span is None:
            return 0.0
        t1, t2 = self.span
        if t2 <= t1:
            return 0.0
        return sum(self.sampled(a) for a in atts) / (t2 - t1)

    # ---- step 0 ----------------------------------------------------------------------------

    def step0_trust(self):
        """0. Trust: choose the keys; `untrusted`, `wrong-key`."""
        bundle_node_key = parse_public_key(self.bundle["node_public_key"])
        pinned_node = self.trust.get("node_public_key")
        pinned_coord = self.trust.get("coordinator_public_key")
        self_asserted = bool(self.trust.get("self_asserted"))
        if pinned_coord is not None:
            self.coord_key = parse_public_key(pinned_coord)
            if self.coord_key is None:
                raise BundleError("trust: the pinned coordinator key is not a key")
        elif self_asserted:
            # "the bundle's own keys are used" -- its coordinator_public_key hint
            self.coord_key = parse_public_key(self.bundle.get("coordinator_public_key"))
        else:
            self.fail("untrusted", "no coordinator key is pinned")
            # § Trust: the rest is still checked, with the bundle's key in place of a
            # pinned one, so the report shows what else is wrong.
            self.coord_key = parse_public_key(self.bundle.get("coordinator_public_key"))
        if pinned_node is not None:
            self.node_key = parse_public_key(pinned_node)
            if self.node_key is None:
                raise BundleError("trust: the pinned node key is not a key")
            if self.node_key != bundle_node_key:
                self.fail("wrong-key", "the pinned node key differs from the bundle's")
        else:
            self.node_key = bundle_node_key

    # ---- step 1 ----------------------------------------------------------------------------

    def step1_verdict(self):
        raw = self.bundle.get("verdict")
        if raw is None:
            self.fail("no-verdict", "the bundle has no verdict")
            return
        item = Item("verdict", 0, raw)
        if item.malformed:
            self.fail("bad-verdict", item.malformed)
            return
        if self.coord_key is None:
            self.fail("bad-verdict", "no coordinator key to check the verdict with")
            return
        try:
            v = open_envelope(item.env, TYPE_VERDICT, self.coord_key)
        except VerifyError as e:
            self.fail("bad-verdict", e.reason)
            return
        self.verdict = v
        if v["lease_id"] != self.lease_id:
            self.fail("verdict-mismatch", f"the verdict is for lease {v['lease_id']}")
        if v["node_id"] != self.node_id():
            self.fail("verdict-mismatch", f"the verdict names node {v['node_id']}")

    # ---- step 2 ----------------------------------------------------------------------------

    def step2_proof(self):
        raw = self.bundle.get("proof")
        if raw is None:
            self.fail("no-proof", "the bundle has no proof")
            return
        item = Item("proof", 0, raw)
        if item.malformed:
            self.fail("bad-payload", f"proof: {item.malformed}")
            return
        try:
            rec = open_envelope(item.env, TYPE_RECORD, self.node_key)
        except VerifyError as e:
            self.fail(NODE_RULE_OF_VARIANT[e.variant], f"proof: {e.reason}")
            return
        if rec["_oneof"] != 14:
            self.fail("bad-payload", "proof: the record is not a LeaseProof")
            return
        p = rec["lease_proof"]
        # GUESS: "(it still counts as the proof)" is read as applying to wrong-node as well as
        # wrong-lease.
        if rec["node_id"] != self.node_id():
            self.fail("wrong-node", f"proof: names node {rec['node_id']}")
        if p["lease_id"] != self.lease_id:
            self.fail("wrong-lease", f"proof: names lease {p['lease_id']}")
        self.proof = p
        self.proof_item = item

    # ---- step 3 ----------------------------------------------------------------------------

    def step3_records(self):
        self.step3a_read_records()
        self.step3b_placement()
        self.step3c_gaps()
        self.step3d_links()
        self.step3e_span()
        self.step3f_content()
        if not self.valid_members():
            # GUESS: "no valid record" is read as "no valid member" (as for the figures); they
            # differ only when an invalid member shadows a valid seq-repeat at the same seq.
            self.fail("empty-chain", "no valid attestation")

    def step3a_read_records(self):
        """Each record, in bundle order: malformed / signature / decode / body / node / lease."""
        for i, raw in enumerate(self.bundle.get("records") or []):
            item = Item("record", i, raw)
            self.records.append(item)
            if item.malformed:
                self.fail("bad-payload", f"{item.label()}: {item.malformed}")
                continue
            sig_failed = False
            try:
                verify_envelope(item.env, TYPE_RECORD, self.node_key)
                item.verified = True
            except VerifyError as e:
                self.fail(NODE_RULE_OF_VARIANT[e.variant], f"{item.label()}: {e.reason}")
                if e.variant in ("WrongPayloadType", "TooLarge"):
                    continue  # nothing more is read from it
                sig_failed = True
            # decoded as a Record whatever the signature said
            try:
                rec = decode_message(item.env.payload, RECORD)
            except DecodeError as e:
                if not sig_failed:
                    self.fail("bad-payload", f"{item.label()}: Record payload does not "
                                             f"decode: {e}")
                continue
            item.msg = rec
            if rec["_oneof"] == 13:
                item.att = rec["attestation"]
            if item.verified:
                if item.att is None:
                    self.fail("bad-payload", f"{item.label()}: not an attestation")
                    continue
                ok = True
                if rec["node_id"] != self.node_id():
                    self.fail("wrong-node", f"{item.label()}: names node {rec['node_id']}")
                    ok = False
                if item.att["lease_id"] != self.lease_id:
                    self.fail("wrong-lease",
                              f"{item.label()}: names lease {item.att['lease_id']}")
                    ok = False
                item.valid = ok

    def step3b_placement(self):
        """Placement by lease seq, then members and seq-repeats."""
        attestations = [it for it in self.records if it.att is not None]
        placed = []  # (seq, item) in bundle order
        for it in self.records:
            if it.att is not None:
                placed.append((it.att["lease_seq"], it))
            elif it.digest is not None:
                # a record with a digest but no attestation: placed at n-1 if some attestation
                # with lease seq n >= 2 links to it (the first such, in bundle order)
                for a in attestations:
                    if a.att["lease_seq"] >= 2 and a.att["prev_sha256"] == it.digest:
                        placed.append((a.att["lease_seq"] - 1, it))
                        break
        for seq, it in placed:  # bundle order
            if seq not in self.members:
                self.members[seq] = it
            else:
                first = self.members[seq]
                if first.digest == it.digest:
                    self.fail("seq-repeat", f"{it.label()} repeats {first.label()}")
                else:
                    self.fail("seq-repeat", f"{it.label()} and {first.label()} both claim "
                                            f"lease seq {seq}")

    def step3c_gaps(self):
        seqs = sorted(self.members)
        if not seqs:
            return
        if seqs[0] == 0:
            self.fail("seq-gap", "lease seqs start at 1")
        elif seqs[0] > 1:
            self.fail("seq-gap", f"lease seqs 1..{seqs[0] - 1} are missing")
        for a, b in zip(seqs, seqs[1:]):
            if b - a > 1:
                self.fail("seq-gap", f"lease seqs {a + 1}..{b - 1} are missing")

    def step3d_links(self):
        seqs = sorted(self.members)
        for s in seqs:
            m = self.members[s]
            if m.att is None:
                continue
            prev = m.att["prev_sha256"]
            if s == seqs[0] and s in (0, 1):
                if prev != ZERO32:
                    self.fail("broken-link", f"lease seq {s}: prev_sha256 is not 32 zero bytes")
            elif (s - 1) in self.members and self.members[s - 1].digest is not None:
                if prev != self.members[s - 1].digest:
                    self.fail("broken-link", f"lease seq {s}: prev_sha256 is not the digest "
                                             f"of lease seq {s - 1}")

    def step3e_span(self):
        """§ Derived figures: the lease's span."""
        if self.proof is not None:
            self.span = (self.proof["t1_unix_ms"], self.proof["t2_unix_ms"])
        elif self.verdict is not None:
            self.span = (self.verdict["t1_unix_ms"], self.verdict["t2_unix_ms"])
        else:
            vm = self.valid_members()
            # GUESS: "the first and last valid windows" = first and last in lease-seq order.
            if vm:
                self.span = (vm[0].att["window_start_unix_ms"], vm[-1].att["window_end_unix_ms"])

    def step3f_content(self):
        prev_end = None
        for m in self.valid_members():
            a, s = m.att, m.att["lease_seq"]
            start, end = a["window_start_unix_ms"], a["window_end_unix_ms"]
            if a["sampled_ms"] < 0 or a["sampled_ms"] > max(0, end - start):
                self.fail("bad-payload", f"lease seq {s}: sampled_ms {a['sampled_ms']} "
                                         f"outside its window")
            bad = [h["verdict"] for h in a["holders"] if h["verdict"] not in HOLDER_VERDICTS]
            if bad:
                self.fail("bad-payload", f"lease seq {s}: holder verdict {bad[0]!r}")
            if a["guard"] not in GUARD_MODES:
                self.fail("bad-payload", f"lease seq {s}: guard {a['guard']!r}")
            if any(p["attempts"] == 0 for p in a["prevented"]):
                self.fail("bad-payload", f"lease seq {s}: a prevented open with 0 attempts")
            if end <= start:
                self.fail("window-backward", f"lease seq {s}: window ends at or before start")
            if prev_end is not None and start < prev_end:
                self.fail("window-overlap", f"lease seq {s}: window starts before the "
                                            f"previous one ended")
            prev_end = end
            if self.span is not None:
                t1, t2 = self.span
                if start < t1 - self.max_skew or end > t2 + self.max_skew:
                    self.fail("window-outside-lease", f"lease seq {s}: window outside "
                                                      f"[{t1}, {t2}] (skew {self.max_skew})")
            if end > self.now + self.max_skew:
                self.fail("window-future", f"lease seq {s}: window ends in the future")
            if self.verdict is not None:
                uuids = [g["uuid"] for g in a["gpus"]]
                if len(set(uuids)) != len(uuids) or set(uuids) != set(self.verdict["gpus"]):
                    self.fail("wrong-gpus", f"lease seq {s}: GPUs {sorted(uuids)} vs the "
                                            f"verdict's {sorted(self.verdict['gpus'])}")

    # ---- step 4 ----------------------------------------------------------------------------

    def step4_countersignatures(self):
        for i, raw in enumerate(self.bundle.get("receipts") or []):
            item = Item("receipt", i, raw)
            if item.malformed:
                self.fail("bad-countersignature", f"{item.label()}: {item.malformed}")
                continue
            if self.coord_key is None:
                self.fail("bad-countersignature", f"{item.label()}: no coordinator key")
                continue
            # A Receipts is checked as itself, anything else as a Receipt.
            ptype = TYPE_RECEIPTS if item.env.payload_type == TYPE_RECEIPTS else TYPE_RECEIPT
            try:
                opened = open_envelope(item.env, ptype, self.coord_key)
            except VerifyError as e:
                self.fail("bad-countersignature", f"{item.label()}: {e.reason}")
                continue
            # Each entry of a Receipts counts as a Receipt signed alone would.
            entries = opened["receipts"] if ptype == TYPE_RECEIPTS else [opened]
            for r in entries:
                if (r["node_id"] != self.node_id() or r["lease_id"] != self.lease_id
                        or len(r["payload_sha256"]) != 32):
                    self.fail("bad-countersignature", f"{item.label()}: another node or lease, "
                                                      f"or not a 32-byte digest")
                    continue
                k = (r["lease_seq"], r["payload_sha256"])
                if k not in self.receipt_index or r["time_unix_ms"] < self.receipt_index[k]:
                    self.receipt_index[k] = r["time_unix_ms"]
        for m in self.valid_members():
            s = m.att["lease_seq"]
            t = self.receipt_index.get((s, m.digest))
            if t is None:
                self.fail("missing-countersignature", f"lease seq {s} has no receipt")
            else:
                self.countersigned[s] = t

    def is_late(self, member):
        t = self.countersigned[member.att["lease_seq"]]
        return t - member.att["window_end_unix_ms"] > self.max_delay

    # ---- step 5 ----------------------------------------------------------------------------

    def step5_challenges(self):
        self.step5a_read_challenges()
        standing = self.step5b_challenge_chain()
        self.step5c_answers(standing)

    def step5a_read_challenges(self):
        for i, raw in enumerate(self.bundle.get("challenges") or []):
            item = Item("challenge", i, raw)
            if item.malformed:
                self.fail("bad-challenge", f"{item.label()}: {item.malformed}")
                continue
            if self.coord_key is None:
                self.fail("bad-challenge", f"{item.label()}: no coordinator key")
                continue
            try:
                c = open_envelope(item.env, TYPE_CHALLENGE, self.coord_key)
            except VerifyError as e:
                self.fail("bad-challenge", f"{item.label()}: {e.reason}")
                continue
            if c["lease_id"] != self.lease_id or c["node_id"] != self.node_id():
                self.fail("bad-challenge", f"{item.label()}: another lease or node")
                continue
            item.msg = c
            self.challenges.append(item)

    def step5b_challenge_chain(self):
        """Returns the standing challenges {index: Item}."""
        standing = {}
        reported_dup = set()
        for it in self.challenges:  # bundle order
            idx = it.msg["index"]
            if idx in standing:
                if idx not in reported_dup:
                    self.fail("broken-challenge-chain", f"several challenges with index {idx}")
                    reported_dup.add(idx)
            else:
                standing[idx] = it
        expected = 1
        prev_digest = ZERO32
        for idx in sorted(standing):
            it = standing[idx]
            if idx > expected:
                self.fail("broken-challenge-chain", f"challenges {expected}..{idx - 1} are "
                                                    f"missing")
            elif idx < expected:
                self.fail("broken-challenge-chain", f"challenge index {idx}")
            else:
                want = ZERO32 if idx == 1 else prev_digest
                if it.msg["prev_sha256"] != want:
                    self.fail("broken-challenge-chain", f"challenge {idx}: prev_sha256 is not "
                                                        f"the previous challenge's digest")
            # GUESS: "the previous standing challenge" is the one just before in index order,
            # whatever its index.
            prev_digest = it.digest
            expected = idx + 1
        if self.verdict is not None:
            # GUESS: "the number of valid challenges" counts every valid challenge, duplicates
            # included (not only the standing ones).
            last = standing[max(standing)].digest if standing else b""
            if (self.verdict["challenges"] != len(self.challenges)
                    or self.verdict["last_challenge_sha256"] != last):
                self.fail("broken-challenge-chain", "the verdict's challenge count or last "
                                                    "challenge differs from the bundle's")
        return standing

    def step5c_answers(self, standing):
        vm = self.valid_members()
        for idx in sorted(standing):
            c = standing[idx].msg
            issued, deadline = c["issued_unix_ms"], c["deadline_unix_ms"]
            if self.span is not None and issued >= self.span[1]:
                continue  # issued once the lease was over
            if not any(m.att["window_start_unix_ms"] <= issued < m.att["window_end_unix_ms"]
                       for m in vm):
                continue  # in a gap
            answered = False
            for m in vm:
                a = m.att
                if c["nonce"] not in a["challenges"]:
                    continue
                if not (a["window_end_unix_ms"] > issued - self.max_skew):
                    continue
                if not (a["window_end_unix_ms"] <= deadline + self.max_skew):
                    continue
                t = self.countersigned.get(a["lease_seq"])
                if t is None or t > deadline + self.max_skew:
                    continue
                answered = True
                break
            if not answered:
                self.fail("missing-challenge", f"challenge {idx} was not answered in time")

    # ---- step 6 ----------------------------------------------------------------------------

    def step6_totals(self):
        vm = self.valid_members()
        atts = [m.att for m in vm]
        claimed = self.coverage(atts)
        countersigned = self.coverage(
            [m.att for m in vm if m.att["lease_seq"] in self.countersigned and not self.is_late(m)])
        if vm and countersigned < self.min_coverage:
            self.fail("low-coverage", f"countersigned coverage {countersigned:.6f} < "
                                      f"{self.min_coverage}")
        if self.proof is not None:
            self.step6a_proof_figures(vm, claimed)
        if self.verdict is not None:
            self.step6b_verdict_commitments(countersigned)

    def step6a_proof_figures(self, vm, claimed):
        p = self.proof
        atts = [m.att for m in vm]
        # GUESS: with no valid member, first/last seq are 0 and restarts is 0 (not -1).
        ours = {
            "first_seq": vm[0].att["lease_seq"] if vm else 0,
            "last_seq": vm[-1].att["lease_seq"] if vm else 0,
            "head_sha256": vm[-1].digest if vm else b"",
            "foreign_events": sum(1 for a in atts for h in a["holders"]
                                  if h["verdict"] == "foreign"),
            "kills": sum(1 for a in atts for e in a["enforcement"]
                         if e["action"] == "kill" and e["sigterm_unix_ms"] > 0),
            "container_stops": sum(1 for a in atts for e in a["enforcement"]
                                   if e["action"] == "stop"),
            "prevented": min(2**64 - 1, sum(a["prevented_more"] +
                                            sum(p["attempts"] for p in a["prevented"])
                                            for a in atts)),
            "restarts": max(0, len({m.msg["start_id"] for m in vm}) - 1),
        }
        for name, value in ours.items():
            if p[name] != value:
                self.fail("proof-mismatch", f"proof {name} {fmt(p[name])}, chain {fmt(value)}")
        if abs(p["coverage"] - claimed) > 1e-6:
            self.fail("proof-mismatch", f"proof coverage {p['coverage']}, chain {claimed}")
        if p["t2_unix_ms"] <= p["t1_unix_ms"]:
            self.fail("proof-mismatch", "proof t2 <= t1")

    def step6b_verdict_commitments(self, countersigned):
        v = self.verdict
        if self.proof is not None:
            for t in ("t1_unix_ms", "t2_unix_ms"):
                if v[t] != self.proof[t]:
                    self.fail("verdict-mismatch", f"verdict {t} {v[t]}, proof {self.proof[t]}")
        top = max(self.members) if self.members else None
        last_seq = top if top is not None else 0
        head = self.members[top].digest if top is not None else b""
        if v["last_seq"] != last_seq:
            self.fail("verdict-mismatch", f"verdict last_seq {v['last_seq']}, chain {last_seq}")
        if v["head_sha256"] != head:
            self.fail("verdict-mismatch", f"verdict head {v['head_sha256'].hex()}, chain "
                                          f"{head.hex()}")
        if abs(v["coverage"] - countersigned) > 1e-6:
            self.fail("verdict-mismatch", f"verdict coverage {v['coverage']}, countersigned "
                                          f"{countersigned}")

    # ---- all -------------------------------------------------------------------------------

    def run(self):
        self.step0_trust()
        self.step1_verdict()
        self.step2_proof()
        self.step3_records()
        self.step4_countersignatures()
        self.step5_challenges()
        self.step6_totals()
        return {"holds": not self.failures, "failures": self.failures}


def fmt(v):
    return v.hex() if isinstance(v, bytes) else v


# --------------------------------------------------------------------------------------------
# Bundle and vector files (§ The bundle, § Conformance vectors)
# --------------------------------------------------------------------------------------------

class BundleError(Exception):
    pass


def check_bundle(bundle):
    """A bundle that is not an object, of another format, or without a lease id / node key is an
    error (no report)."""
    if not isinstance(bundle, dict):
        raise BundleError("bundle: not a JSON object")
    if bundle.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"bundle: format {bundle.get('format')!r}")
    if not isinstance(bundle.get("lease_id"), str):
        raise BundleError("bundle: missing lease_id")
    if parse_public_key(bundle.get("node_public_key")) is None:
        raise BundleError("bundle: node_public_key is missing or not a key")


def run_vector(vector):
    bundle = vector["bundle"]
    check_bundle(bundle)
    return Lease(bundle, vector["trust"], vector["params"]).run()


def run_all(directory):
    ok = True
    names = sorted(f for f in os.listdir(directory) if f.endswith(".json"))
    agree = 0
    for name in names:
        with open(os.path.join(directory, name)) as fh:
            vector = json.load(fh)
        try:
            result = run_vector(vector)
            got = sorted(f["rule"] for f in result["failures"])
            got_holds = result["holds"]
        except BundleError as e:
            got, got_holds = [f"<{e}>"], False
        exp = vector["expected"]
        if got == sorted(exp["failures"]) and got_holds == exp["holds"]:
            agree += 1
            print(f"ok        {name}")
        else:
            ok = False
            print(f"MISMATCH  {name}: expected {sorted(exp['failures'])} holds={exp['holds']}; "
                  f"got {got} holds={got_holds}")
    print(f"{agree}/{len(names)} vectors agree")
    return ok


def main(argv):
    if len(argv) == 3 and argv[1] == "--all":
        return 0 if run_all(argv[2]) else 1
    if len(argv) == 2:
        with open(argv[1]) as fh:
            vector = json.load(fh)
        try:
            result = run_vector(vector)
        except BundleError as e:
            print(str(e), file=sys.stderr)
            return 1
        print(json.dumps(result, indent=1))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
