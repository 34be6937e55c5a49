-- capnp-noise.lua: a Wireshark / tshark dissector for the capnp-noise wire
-- protocol, version 1 (SPEC.md, document revision 1.1), over TCP.
--
-- Load it for one run:
--
--   tshark -r FILE -X lua_script:contrib/wireshark/capnp-noise.lua \
--          -o capnp_noise.port:4000
--   wireshark -X lua_script:contrib/wireshark/capnp-noise.lua -r FILE
--
-- or for good: copy it into the personal Lua plugins folder (Help > About
-- Wireshark > Folders > Personal Lua Plugins, e.g.
-- ~/.local/lib/wireshark/plugins/).
--
-- Which connections it dissects:
--   * TCP port(s) of the preference "capnp_noise.port" (Edit > Preferences >
--     Protocols > CAPNP-NOISE; a range such as "4000,7000-7002"; empty by
--     default, as capnp-noise has no assigned port);
--   * "Decode As..." (TCP port, CAPNP-NOISE), or `-d tcp.port==P,capnp_noise`;
--   * any TCP connection whose first bytes are the magic "capnp-noise"
--     (a heuristic: "capnp_noise_tcp" in Analyze > Enabled Protocols).
--
-- What it shows, per SPEC.md:
--   * section 2, the preamble: magic, version, name_len, name, and the
--     suite (section 3) that name is: mandatory, optional, or unknown;
--   * sections 4 and 6, the three handshake messages with their lengths:
--     message 1 (the initiator's ephemeral key `e`, in clear), message 2
--     (the responder's `e` in clear, then its encrypted static key and
--     encrypted payload), message 3 (the initiator's encrypted static key
--     and encrypted payload), with the payload length the sizes imply;
--   * section 7, transport frames: length, ordinal per direction and the
--     implicit nonce (ordinal - 1; the nonce is not reset by a rekey), the
--     encrypted plaintext and the AEAD tag. The frame type (DATA, CLOSE,
--     REKEY) is the last byte of the encrypted plaintext: it cannot be seen
--     without keys, and so neither can rekeys, closes and keepalives;
--   * the failures a capture shows, as expert info: a length outside the
--     bounds of section 4's table ("Malformed" errors; the receiver closes
--     at once, so what follows in that direction is shown as unread), a
--     bad magic, version, name_len or name byte (section 2), a suite that
--     is not one of section 3, a responder that sends before message 1 is
--     complete, an initiator that sends "early bytes" before message 2 is
--     complete (section 6), and how each side's byte stream ended (TCP FIN
--     or RST): a silent close before message 2 (section 2), an initiator
--     that sends no message 3 (it refused the responder, section 5.4), a
--     responder that ends the stream after message 3 without a frame, and
--     a stream that ends in the middle of a message (a truncation).
--
-- Fields (all filterable, e.g. `capnp_noise.frame.len == 65535`):
--   capnp_noise.role, capnp_noise.pdu, capnp_noise.preamble.{magic,version,
--   name_len,name}, capnp_noise.suite, capnp_noise.suite.status,
--   capnp_noise.handshake.{msg,len,e,s,payload,payload_len},
--   capnp_noise.frame.{number,len,nonce,ciphertext,tag,body_len},
--   capnp_noise.unread, capnp_noise.end; expert infos capnp_noise.expert.*.
--
-- Limits:
--   * It decrypts nothing: handshake payloads (VatIds, signatures), frame
--     types and frame contents are encrypted. `capnp-noise decode` with a
--     key log shows them. So it cannot see a CLOSE either: bytes a sender
--     puts after its CLOSE (which SPEC 7.2 forbids and a receiver ignores)
--     are shown as frames like any others.
--   * The capture must hold the start of each TCP connection: the first
--     bytes of a connection are taken as the initiator's preamble (the
--     responder sends nothing first, SPEC 6), and a capture that starts in
--     the middle of a connection is shown as an invalid preamble.
--   * It needs TCP reassembly (tcp.desegment_tcp_streams, on by default);
--     without it a message split over segments is shown as incomplete and
--     that direction is no longer followed.
--   * Segments are taken in the order TCP hands them over: lost or
--     out-of-order segments that TCP does not repair confuse the framing
--     from that point on in that direction.
--   * The sizes of handshake messages assume SPEC's X25519 (DHLEN 32) and
--     16-byte tags, also for a suite that is not in SPEC section 3.
--   * A later protocol version (a version byte other than 1) is not
--     dissected beyond its version byte.
--   * The heuristic looks at a connection's first segment only, and needs
--     the whole magic (11 bytes) in it; use the port preference otherwise.
--   * A TCP connection is told apart by its two endpoints (addresses and
--     ports); a new connection between the same endpoints is noticed by its
--     SYN, so the capture must hold the SYN when ports are reused.
--   * On a second pass (clicking a packet in the GUI, `tshark -2`), the
--     results of the first pass are looked up by frame number and the
--     first bytes TCP hands over; two calls within one frame that start
--     with the same 16 bytes (never seen with real traffic, whose bytes are
--     random) would be shown alike.
--   * The end-of-stream notes need TCP's flags, which a Lua script can read
--     only where Wireshark builds a protocol tree on the first pass (the
--     GUI and single-pass tshark do; `tshark -2` does not, so with -2 the
--     messages are shown but the end-of-stream notes are not).
--
-- Written for Wireshark 3.6 to 4.x (Lua 5.2); tested with tshark 4.0
-- (Debian bookworm) by tests/wireshark.rs.

local MAGIC = "capnp-noise"
local VERSION = 1
local MAX_NAME_LEN = 64
local HEADER_LEN = #MAGIC + 2 -- magic, version, name_len
local TAG_LEN = 16
local DH_LEN = 32
local MAX_PAYLOAD = 4096

-- SPEC 3.
local SUITES = {
    ["Noise_XX_25519_ChaChaPoly_BLAKE2s"] = "mandatory",
    ["Noise_XX_25519_AESGCM_SHA256"] = "optional",
}

-- SPEC 4: the bounds of each expected message's length.
local BOUNDS = {
    msg1 = { 32, 32 },
    msg2 = { 96, 96 + MAX_PAYLOAD },
    msg3 = { 64, 64 + MAX_PAYLOAD },
    frame = { 17, 65535 },
}

-- What each message is called (the Info column, capnp_noise.pdu).
local TITLE = {
    preamble = "Preamble", msg1 = "Handshake msg 1", msg2 = "Handshake msg 2",
    msg3 = "Handshake msg 3", frame = "Transport frame", unread = "Unread bytes",
}

-- The values of a table, for proto.fields and proto.experts.
local function values(t)
    local v = {}
    for _, x in pairs(t) do v[#v + 1] = x end
    return v
end

local proto = Proto("capnp_noise", "CAPNP-NOISE (Cap'n Proto over Noise XX)")
local ends = Proto("capnp_noise_end", "CAPNP-NOISE end of stream")

local f = {
    role = ProtoField.string("capnp_noise.role", "Sender"),
    pdu = ProtoField.string("capnp_noise.pdu", "Message"),
    preamble = ProtoField.bytes("capnp_noise.preamble", "Preamble"),
    magic = ProtoField.string("capnp_noise.preamble.magic", "Magic"),
    version = ProtoField.uint8("capnp_noise.preamble.version", "Version", base.DEC),
    name_len = ProtoField.uint8("capnp_noise.preamble.name_len", "Name length", base.DEC),
    name = ProtoField.string("capnp_noise.preamble.name", "Noise protocol name"),
    suite = ProtoField.string("capnp_noise.suite", "Suite"),
    suite_status = ProtoField.string("capnp_noise.suite.status", "Suite status (SPEC 3)"),
    hs_msg = ProtoField.uint8("capnp_noise.handshake.msg", "Handshake message", base.DEC),
    hs_len = ProtoField.uint16("capnp_noise.handshake.len", "Length", base.DEC),
    hs_e = ProtoField.bytes("capnp_noise.handshake.e", "Ephemeral key e (clear)"),
    hs_s = ProtoField.bytes("capnp_noise.handshake.s", "Static key s (encrypted, 32 + 16-byte tag)"),
    hs_payload = ProtoField.bytes("capnp_noise.handshake.payload", "Payload (encrypted, + 16-byte tag)"),
    hs_payload_len = ProtoField.uint16("capnp_noise.handshake.payload_len", "Payload length (plaintext)", base.DEC),
    fr_number = ProtoField.uint32("capnp_noise.frame.number", "Frame number (this direction)", base.DEC),
    fr_len = ProtoField.uint16("capnp_noise.frame.len", "Length", base.DEC),
    fr_nonce = ProtoField.uint64("capnp_noise.frame.nonce", "Nonce (implicit)", base.DEC),
    fr_ciphertext = ProtoField.bytes("capnp_noise.frame.ciphertext", "Encrypted plaintext (body || type)"),
    fr_tag = ProtoField.bytes("capnp_noise.frame.tag", "AEAD tag"),
    fr_body_len = ProtoField.uint16("capnp_noise.frame.body_len", "Body length (plaintext minus the type byte)", base.DEC),
    unread = ProtoField.bytes("capnp_noise.unread", "Unread bytes"),
}
proto.fields = values(f)
local f_end = ProtoField.string("capnp_noise.end", "End of stream")
local f_end_role = ProtoField.string("capnp_noise.end.role", "Ended by")
ends.fields = { f_end, f_end_role }

local function new_expert(abbr, text, group, severity)
    return ProtoExpert.new("capnp_noise.expert." .. abbr, text, expert.group[group], expert.severity[severity])
end

local ex = {
    too_short = new_expert("length_too_short",
        "Length below the minimum of SPEC 4", "MALFORMED", "ERROR"),
    too_long = new_expert("length_too_long",
        "Length above the maximum of SPEC 4", "MALFORMED", "ERROR"),
    bad_magic = new_expert("bad_magic",
        "Not a capnp-noise preamble (SPEC 2)", "MALFORMED", "ERROR"),
    bad_version = new_expert("bad_version",
        "Unknown protocol version (SPEC 2)", "PROTOCOL", "ERROR"),
    bad_name_len = new_expert("bad_name_len",
        "name_len outside 1 to 64 (SPEC 2)", "MALFORMED", "ERROR"),
    bad_name_byte = new_expert("bad_name_byte",
        "Name byte outside 0x21-0x7e (SPEC 2)", "MALFORMED", "ERROR"),
    unknown_suite = new_expert("unknown_suite",
        "Suite not in SPEC 3", "PROTOCOL", "WARN"),
    responder_first = new_expert("responder_first",
        "Responder sent before message 1 was complete (SPEC 6)", "PROTOCOL", "ERROR"),
    early_bytes = new_expert("early_bytes",
        "Initiator sent before message 2 was complete (SPEC 6)", "PROTOCOL", "WARN"),
    unread = new_expert("unread",
        "Bytes not dissected (after a fatal error, or without TCP reassembly)", "SEQUENCE", "NOTE"),
    incomplete = new_expert("incomplete",
        "Incomplete message: TCP reassembly is off", "REASSEMBLE", "WARN"),
}
proto.experts = values(ex)
local ex_end = {
    silent_close = new_expert("silent_close",
        "Silent close: the responder ended the stream without answering message 1 (SPEC 2)", "SEQUENCE", "WARN"),
    refused = new_expert("refused",
        "A side ended the stream in the handshake without answering (SPEC 5.4)", "SEQUENCE", "WARN"),
    truncated = new_expert("truncated",
        "The stream ended in the middle of a message: a truncation (SPEC 8.2)", "MALFORMED", "ERROR"),
    ended = new_expert("ended",
        "End of a byte stream", "SEQUENCE", "CHAT"),
}
ends.experts = values(ex_end)

proto.prefs.port = Pref.range("TCP port(s)", "",
    "TCP port(s) of capnp-noise listeners (a range, e.g. 4000,7000-7002)", 65535)

-- Read by the end-of-stream postdissector only. (Lua reads no field where
-- TCP builds no tree, as in tshark -2's first pass; the messages need no
-- field, so only the end-of-stream notes are then missing.)
local tcp_syn = Field.new("tcp.flags.syn")
local tcp_ack = Field.new("tcp.flags.ack")
local tcp_fin = Field.new("tcp.flags.fin")
local tcp_rst = Field.new("tcp.flags.reset")

-- State:
--   streams[conversation] = {
--     initiator = "addr:port", refused = reason or nil,
--     I = direction, R = direction }
--   direction = { phase = "preamble"|"msg1"|"msg2"|"msg3"|"frame",
--     frames = count, bytes = count, dead = reason or nil,
--     partial = what is awaited or nil, ended = bool }
--   calls[key] = the PDUs one dissector call found on the first pass
--   end_notes[frame number] = what the end-of-stream postdissector found
--
-- The init routines run before every pass over the packets: before the
-- first (a new file, a reload, a preference change), and again before
-- tshark -2's second pass, which must replay the first pass's results
-- (TCP hands over the reassembled messages as the first pass asked for
-- them, and the state is that of the end of the capture by then). So the
-- state is reset only when the pass is a first one: its packets are not
-- yet visited.
local streams, calls, end_notes = {}, {}, {}
local fresh = true
proto.init = function() fresh = true end

local function starting(pinfo)
    if fresh then
        fresh = false
        if not pinfo.visited then streams, calls, end_notes = {}, {}, {} end
    end
end

local function endpoint(addr, port)
    return tostring(addr) .. ":" .. tostring(port)
end

-- The TCP connection of the current packet, as its two endpoints in a
-- fixed order; and the sender.
local function conversation(pinfo)
    local a, b = endpoint(pinfo.src, pinfo.src_port), endpoint(pinfo.dst, pinfo.dst_port)
    if a < b then return a .. " " .. b, a end
    return b .. " " .. a, a
end

local function new_direction(phase)
    return { phase = phase, frames = 0, bytes = 0 }
end

-- The stream and the sender's role ("I" or "R") of the current packet; the
-- first sender of a stream is its initiator (the responder sends nothing
-- before the preamble and message 1, SPEC 6).
local function stream_of(pinfo, create)
    local id, sender = conversation(pinfo)
    local st = streams[id]
    if st == nil then
        if not create then return nil end
        st = { initiator = sender, I = new_direction("preamble"), R = new_direction("msg2") }
        streams[id] = st
    end
    return st, (sender == st.initiator) and "I" or "R"
end

-- A new connection between the same endpoints (a SYN without ACK) starts
-- afresh.
local function forget_on_syn(pinfo)
    local syn, ack = tcp_syn(), tcp_ack()
    if syn ~= nil and syn.value and ack ~= nil and not ack.value then
        streams[(conversation(pinfo))] = nil
    end
end

local ROLE_NAME = { I = "initiator", R = "responder" }

-- A framed message (SPEC 4) at `off`: needs 2 length bytes, checks the
-- length against `bounds` at once, then needs the whole message.
-- Returns pdu, used or nil, more_needed.
local function framed(tvb, off, avail, kind, bounds)
    -- Until the length is known, ask TCP for one more segment (asking for
    -- an exact count and then for more confuses TCP's second pass).
    if avail < 2 then return nil, DESEGMENT_ONE_MORE_SEGMENT end
    local len = tvb(off, 2):uint()
    if len < bounds[1] or len > bounds[2] then
        return { kind = kind, len = len, bad = (len < bounds[1]) and "short" or "long",
                 bounds = bounds }, 2
    end
    if avail < 2 + len then return nil, 2 + len - avail end
    return { kind = kind, len = len }, 2 + len
end

-- The preamble (SPEC 2), read byte by byte as a responder does.
local function preamble(tvb, off, avail)
    local n = math.min(avail, #MAGIC)
    for i = 0, n - 1 do
        if tvb(off + i, 1):uint() ~= MAGIC:byte(i + 1) then
            return { kind = "preamble", bad = "magic", at = i }, i + 1
        end
    end
    if avail < #MAGIC + 1 then return nil, DESEGMENT_ONE_MORE_SEGMENT end
    local version = tvb(off + #MAGIC, 1):uint()
    if version ~= VERSION then
        return { kind = "preamble", bad = "version", version = version }, #MAGIC + 1
    end
    if avail < HEADER_LEN then return nil, DESEGMENT_ONE_MORE_SEGMENT end
    local name_len = tvb(off + #MAGIC + 1, 1):uint()
    if name_len == 0 or name_len > MAX_NAME_LEN then
        return { kind = "preamble", bad = "name_len", name_len = name_len }, HEADER_LEN
    end
    local have = math.min(avail - HEADER_LEN, name_len)
    for i = 0, have - 1 do
        local b = tvb(off + HEADER_LEN + i, 1):uint()
        if b < 0x21 or b > 0x7e then
            return { kind = "preamble", bad = "name_byte", at = i, name_len = name_len }, HEADER_LEN + i + 1
        end
    end
    if have < name_len then return nil, name_len - have end
    local name = tvb(off + HEADER_LEN, name_len):string()
    return { kind = "preamble", name = name, name_len = name_len }, HEADER_LEN + name_len
end

-- What follows each message in its direction (SPEC 6: exactly three
-- handshake messages, then transport frames).
local NEXT = { preamble = "msg1", msg1 = "msg3", msg2 = "frame", msg3 = "frame", frame = "frame" }

-- The next PDU of the sender's direction at `off`, on the first pass: it
-- advances the state only for a complete PDU. Returns pdu, used or nil, more.
local function next_pdu(st, role, tvb, off, avail)
    local d = st[role]
    if d.dead then
        d.bytes = d.bytes + avail
        return { kind = "unread", why = d.dead, role = role }, avail
    end
    local pdu, used
    if d.phase == "preamble" then
        pdu, used = preamble(tvb, off, avail)
    else
        pdu, used = framed(tvb, off, avail, d.phase, BOUNDS[d.phase])
    end
    if pdu == nil then
        d.partial = d.phase
        return nil, used
    end
    d.partial = nil
    d.bytes = d.bytes + used
    pdu.role = role
    local other = st[role == "I" and "R" or "I"]
    if role == "R" and d.phase == "msg2" and (st.I.phase == "preamble" or st.I.phase == "msg1") then
        pdu.responder_first = true
    end
    if role == "I" and d.phase == "msg3" and other.phase == "msg2" then
        pdu.early = true
    end
    if pdu.bad then
        if pdu.kind == "preamble" then
            -- The responder closes without sending anything (SPEC 2).
            st.refused = "an invalid preamble (SPEC 2)"
            d.dead = "after an invalid preamble, the responder reads no further (SPEC 2)"
            other.dead = "after an invalid preamble, a responder sends nothing (SPEC 2)"
        else
            st.refused = st.refused or ("a malformed " .. TITLE[pdu.kind] .. " (SPEC 4)")
            d.dead = "after a length outside SPEC 4's bounds, the receiver reads no further"
        end
    elseif pdu.kind == "frame" then
        d.frames = d.frames + 1
        pdu.number = d.frames
    end
    if not pdu.bad then d.phase = NEXT[d.phase] end
    return pdu, used
end

local MSG_NUMBER = { msg1 = 1, msg2 = 2, msg3 = 3 }

local function title(pdu, size)
    if pdu.kind == "preamble" then
        if pdu.bad then return "Preamble (invalid: " .. pdu.bad .. ")" end
        return "Preamble (" .. pdu.name .. ")"
    elseif pdu.kind == "frame" then
        if pdu.bad then return "Transport frame (bad length " .. pdu.len .. ")" end
        return string.format("Transport frame #%d (%d bytes)", pdu.number, pdu.len)
    elseif pdu.kind == "unread" then
        return string.format("Unread bytes (%d)", size)
    elseif pdu.bad then
        return string.format("%s (bad length %d)", TITLE[pdu.kind], pdu.len)
    end
    return string.format("%s (%d bytes)", TITLE[pdu.kind], pdu.len)
end

local function add_length_expert(item, pdu)
    local lo, hi = pdu.bounds[1], pdu.bounds[2]
    local what = TITLE[pdu.kind]
    local expected = (lo == hi) and string.format("exactly %d", lo)
        or string.format("%d to %d", lo, hi)
    local text = string.format("%s: length %d, SPEC 4 allows %s; the receiver closes without reading further",
        what, pdu.len, expected)
    item:add_proto_expert_info(pdu.bad == "short" and ex.too_short or ex.too_long, text)
end

local function render_preamble(sub, tvb, off, size, pdu)
    sub:add(f.preamble, tvb(off, size))
    local magic_len = math.min(size, #MAGIC)
    local m = sub:add(f.magic, tvb(off, magic_len))
    if pdu.bad == "magic" then
        m:add_proto_expert_info(ex.bad_magic, string.format(
            "Not a capnp-noise preamble: byte %d differs from the magic \"capnp-noise\" "
            .. "(or the capture starts after the connection's first bytes); "
            .. "a responder closes without sending anything", pdu.at))
        return
    end
    local v = sub:add(f.version, tvb(off + #MAGIC, 1))
    if pdu.bad == "version" then
        v:add_proto_expert_info(ex.bad_version, string.format(
            "Version %d: this dissector knows version 1 only; a version-1 responder closes "
            .. "without sending anything", pdu.version))
        return
    end
    local nl = sub:add(f.name_len, tvb(off + #MAGIC + 1, 1))
    if pdu.bad == "name_len" then
        nl:add_proto_expert_info(ex.bad_name_len, string.format(
            "name_len %d is outside 1 to 64; a responder closes without sending anything", pdu.name_len))
        return
    end
    local name_bytes = size - HEADER_LEN
    local n = sub:add(f.name, tvb(off + HEADER_LEN, name_bytes))
    if pdu.bad == "name_byte" then
        n:add_proto_expert_info(ex.bad_name_byte, string.format(
            "Name byte %d (0x%02x) is outside 0x21-0x7e; a responder closes without sending anything",
            pdu.at, tvb(off + HEADER_LEN + pdu.at, 1):uint()))
        return
    end
    local status = SUITES[pdu.name]
    local s = sub:add(f.suite, tvb(off + HEADER_LEN, name_bytes), pdu.name)
    s:set_generated()
    local st = sub:add(f.suite_status, tvb(off + HEADER_LEN, name_bytes), status or "not in SPEC rev 1.1")
    st:set_generated()
    if not status then
        s:add_proto_expert_info(ex.unknown_suite, "Suite " .. pdu.name
            .. " is not in SPEC 3: a responder that does not accept it closes without answering; "
            .. "the sizes below assume X25519 and 16-byte tags")
    end
end

local function render_handshake(sub, tvb, off, size, pdu)
    sub:add(f.hs_msg, tvb(off, 2), MSG_NUMBER[pdu.kind]):set_generated()
    local li = sub:add(f.hs_len, tvb(off, 2))
    if pdu.bad then
        add_length_expert(li, pdu)
        return
    end
    local p = off + 2
    if pdu.kind == "msg1" then
        sub:add(f.hs_e, tvb(p, DH_LEN))
        return
    end
    if pdu.kind == "msg2" then
        sub:add(f.hs_e, tvb(p, DH_LEN))
        p = p + DH_LEN
    end
    sub:add(f.hs_s, tvb(p, DH_LEN + TAG_LEN))
    p = p + DH_LEN + TAG_LEN
    local enc = off + 2 + pdu.len - p
    sub:add(f.hs_payload, tvb(p, enc))
    sub:add(f.hs_payload_len, tvb(p, enc), enc - TAG_LEN):set_generated()
end

local function render_frame(sub, tvb, off, size, pdu)
    if pdu.bad then
        add_length_expert(sub:add(f.fr_len, tvb(off, 2)), pdu)
        return
    end
    sub:add(f.fr_number, tvb(off, 2), pdu.number):set_generated()
    sub:add(f.fr_nonce, tvb(off, 2), UInt64(pdu.number - 1)):set_generated()
    sub:add(f.fr_len, tvb(off, 2))
    local plain = pdu.len - TAG_LEN
    sub:add(f.fr_ciphertext, tvb(off + 2, plain))
    sub:add(tvb(off + 2 + plain - 1, 1),
        "Type: encrypted (the last plaintext byte: DATA, CLOSE or REKEY, SPEC 7.1)")
    sub:add(f.fr_body_len, tvb(off + 2, plain), plain - 1):set_generated()
    sub:add(f.fr_tag, tvb(off + 2 + plain, TAG_LEN))
end

local function render(tvb, pinfo, tree, off, size, pdu)
    local text = title(pdu, size)
    local sub = tree:add(proto, tvb(off, size), "CAPNP-NOISE, " .. text)
    sub:add(f.role, tvb(off, size), ROLE_NAME[pdu.role]):set_generated()
    sub:add(f.pdu, tvb(off, size), TITLE[pdu.kind]):set_generated()
    if pdu.kind == "preamble" then
        render_preamble(sub, tvb, off, size, pdu)
    elseif pdu.kind == "frame" then
        render_frame(sub, tvb, off, size, pdu)
    elseif pdu.kind == "unread" then
        sub:add(f.unread, tvb(off, size))
        sub:add_proto_expert_info(ex.unread, "Not dissected: " .. pdu.why)
    else
        render_handshake(sub, tvb, off, size, pdu)
    end
    if pdu.responder_first then
        sub:add_proto_expert_info(ex.responder_first,
            "The responder sent this before the initiator's preamble and message 1 were complete; "
            .. "an initiator takes it as message 2")
    end
    if pdu.early then
        sub:add_proto_expert_info(ex.early_bytes,
            "Early bytes: sent after message 1 before message 2 was complete; the responder takes "
            .. "them as message 3, and they fail (this implementation closes without message 2)")
    end
    -- The Info column: "Preamble (...), Handshake msg 1 (32 bytes)".
    if tostring(pinfo.cols.protocol) == "CAPNP-NOISE" then
        pinfo.cols.info:append(", " .. text)
    else
        pinfo.cols.protocol = "CAPNP-NOISE"
        pinfo.cols.info:set(text)
    end
end

-- A call is known by its frame and its first bytes, not by its length: on
-- a second pass TCP may hand over only the messages the first pass found
-- complete in this frame, without the start of a message that went on
-- later (which it hands over again in the frame where it ends).
local function call_key(pinfo, tvb)
    local n = math.min(tvb:len(), 16)
    local head = n > 0 and tvb(0, n):bytes():tohex() or ""
    return pinfo.number .. ":" .. head
end

-- One call of TCP: the PDUs in `tvb`, and where to ask for more bytes.
function proto.dissector(tvb, pinfo, tree)
    local total = tvb:len()
    if total == 0 then return 0 end
    starting(pinfo)
    local key = call_key(pinfo, tvb)
    local rec = calls[key]
    if rec == nil then
        local st, role = stream_of(pinfo, true)
        if st == nil then return 0 end
        rec = { pdus = {} }
        local off = 0
        while off < total do
            local pdu, used = next_pdu(st, role, tvb, off, total - off)
            if pdu == nil then
                rec.more_at, rec.more = off, used
                if pinfo.can_desegment == 0 then
                    st[role].dead = "TCP reassembly is off (tcp.desegment_tcp_streams), so this "
                        .. "direction is not followed past a message split over segments"
                end
                break
            end
            rec.pdus[#rec.pdus + 1] = { off = off, size = used, pdu = pdu }
            off = off + used
        end
        calls[key] = rec
    end
    for _, p in ipairs(rec.pdus) do
        if p.off + p.size <= total then
            render(tvb, pinfo, tree, p.off, p.size, p.pdu)
        end
    end
    if rec.more_at and rec.more_at < total then
        if pinfo.can_desegment > 0 then
            pinfo.desegment_offset = rec.more_at
            pinfo.desegment_len = rec.more
        else
            local item = tree:add(proto, tvb(rec.more_at), "CAPNP-NOISE, incomplete message")
            pinfo.cols.protocol = "CAPNP-NOISE"
            pinfo.cols.info:append(" [incomplete message: TCP reassembly is off]")
            item:add_proto_expert_info(ex.incomplete,
                "The rest is in later segments: enable TCP reassembly (tcp.desegment_tcp_streams)")
        end
    end
    return total
end

-- The end of each side's byte stream (a TCP FIN or RST), judged against
-- the handshake's progress on the first pass (SPEC 2, 5.4, 7.2, 8.2).
local function judge_end(st, role, how)
    local d = st[role]
    local other = st[role == "I" and "R" or "I"]
    if d.partial then
        return ex_end.truncated, string.format("The %s's stream ended (%s) in the middle of %s: a truncation",
            ROLE_NAME[role], how, TITLE[d.partial])
    end
    if role == "R" then
        if d.bytes == 0 then
            if st.refused then
                return ex_end.ended, string.format(
                    "The responder ended the stream (%s) without answering %s, as it must",
                    how, st.refused)
            elseif other.phase == "preamble" or other.phase == "msg1" then
                return ex_end.silent_close, string.format(
                    "The responder ended the stream (%s) before the initiator's preamble and message 1 "
                    .. "were complete (a first-message timeout, SPEC 8.1, or not a capnp-noise responder)", how)
            end
            return ex_end.silent_close, string.format(
                "Silent close (%s): the responder ended the stream without answering message 1: it does "
                .. "not accept this suite or version, is not a capnp-noise responder, gave up before "
                .. "admitting the handshake, or the connection was cut (SPEC 2)", how)
        end
        if d.frames == 0 and d.phase == "frame" and other.phase == "frame" then
            return ex_end.refused, string.format(
                "The responder ended the stream (%s) after message 3 without a transport frame: it "
                .. "refused the initiator (SPEC 5.4), or failed, or the connection was cut", how)
        end
    else
        if d.phase == "msg3" and other.phase == "frame" then
            return ex_end.refused, string.format(
                "The initiator ended the stream (%s) after message 2 without sending message 3: it "
                .. "refused the responder (SPEC 5.4), or gave up, or the connection was cut", how)
        end
        if d.phase == "msg3" then
            return ex_end.ended, string.format(
                "The initiator ended the stream (%s) before message 2 arrived (it gave up)", how)
        end
    end
    return ex_end.ended, string.format("The %s ended its byte stream (%s) after %d transport frame(s)",
        ROLE_NAME[role], how, d.frames)
end

function ends.dissector(tvb, pinfo, tree)
    starting(pinfo)
    local note = end_notes[pinfo.number]
    if note == nil and not pinfo.visited then
        forget_on_syn(pinfo)
        local fin, rst = tcp_fin(), tcp_rst()
        local is_fin = fin ~= nil and fin.value
        local is_rst = rst ~= nil and rst.value
        if not (is_fin or is_rst) then return end
        local st, role = stream_of(pinfo, false)
        if st == nil or st[role].ended then return end
        st[role].ended = true
        local expert_info, text = judge_end(st, role, is_rst and "RST" or "FIN")
        note = { role = role, expert = expert_info, text = text }
        end_notes[pinfo.number] = note
    end
    if note == nil then return end
    local sub = tree:add(ends, "CAPNP-NOISE, end of the " .. ROLE_NAME[note.role] .. "'s stream")
    sub:add(f_end_role, ROLE_NAME[note.role]):set_generated()
    local item = sub:add(f_end, note.text)
    item:set_generated()
    item:add_proto_expert_info(note.expert, note.text)
    if note.expert ~= ex_end.ended then
        pinfo.cols.info:append(" [" .. note.text:match("^[^:(]*"):gsub("%s+$", "") .. "]")
    end
end
register_postdissector(ends)

-- Ports (the preference) and "Decode As".
local tcp_port_table = DissectorTable.get("tcp.port")
local registered = ""

function proto.prefs_changed()
    local ports = tostring(proto.prefs.port or "")
    if ports == registered then return end
    if registered ~= "" then tcp_port_table:remove(registered, proto) end
    if ports ~= "" then tcp_port_table:add(ports, proto) end
    registered = ports
end

tcp_port_table:add_for_decode_as(proto)

-- The heuristic: a TCP stream whose first bytes are the magic.
local function heuristic(tvb, pinfo, tree)
    if tvb:len() < #MAGIC or tvb:raw(0, #MAGIC) ~= MAGIC then return false end
    if stream_of(pinfo, false) ~= nil then return false end
    pinfo.conversation = proto
    proto.dissector(tvb, pinfo, tree)
    return true
end
proto:register_heuristic("tcp", heuristic)
