-- rmsg.lua: a Wireshark/tshark dissector for rmsg's wire format, version 1.
--
-- The layout is docs/protocol.md section 2 (and section 9 for the sealed
-- modes, section 10 for the group kinds); reliable/wire.py is its executable
-- form, and this file follows it field for field:
--
--   header (32) | [packet number (8), sealed only] | [cookie (16), flag COOKIE]
--   | SACK ranges | verdict notices | [group name, kinds 16-24]
--   | body: DATA/GDATA fragment records (DATA may bundle several),
--           AUTH_FAILED one refusal byte, PROBE a probe number and padding,
--           PROBE_ACK a probe number
--   | [tag (16), sealed only] | CRC-32 (4) over everything before it
--
-- Found by a heuristic on every UDP port (magic "RM", version 1, a known
-- kind, reserved flag bits clear), so `rmsg` traffic decodes whatever port
-- it uses; also offered for "Decode As" and bound to port 7431, rmsg's
-- conventional port. Fragments are numbered from 1 in the Info column and in
-- rmsg.frag.number, as `rmsg dissect` numbers them; rmsg.frag.index is the
-- 0-based wire value. A DATA datagram carrying a fragment already seen from
-- the same incarnation is marked as a retransmission, as `rmsg dissect` does.
--
-- Install: `rmsg wireshark install` (copies this file into your personal Lua
-- plugin folder), or run once: tshark -X lua_script:rmsg.lua -r capture.pcap

local rmsg = Proto("rmsg", "rmsg reliable messaging over UDP")

local MAGIC = 0x524D
local VERSION = 1
local HEADER = 32
local TAG = 16
local COOKIE = 16

local KINDS = {
    [1] = "DATA", [2] = "ACK", [3] = "PING", [4] = "CLOSE", [5] = "RESET",
    [6] = "CHALLENGE", [7] = "AUTH_FAILED", [8] = "DROPPED", [9] = "PROBE", [10] = "PROBE_ACK",
    [16] = "GDATA", [17] = "GACK", [18] = "GNAK", [19] = "GSYNC", [20] = "JOIN",
    [21] = "LEAVE", [22] = "SOLICIT", [23] = "ANNOUNCE", [24] = "WITHDRAW",
}
local VERDICTS = {
    [1] = "TOO_LARGE", [2] = "NO_MAILBOX", [3] = "MAILBOX_CLOSED", [4] = "REFUSED",
    [5] = "NO_MEMORY", [6] = "DEFERRED", [7] = "CANCELLED", [8] = "STAGED",
}
local REFUSALS = { [1] = "bad tag", [2] = "unsealed", [3] = "wrong mode" }

local F_ACK_NOW, F_ACK, F_CONTROL, F_COOKIE = 0x0001, 0x0002, 0x0004, 0x0008
local F_NESTED = 0x0010
local F_AUTHENTICATED, F_ENCRYPTED = 0x0100, 0x0200
local KNOWN_FLAGS = 0x031F

local pf = {
    magic = ProtoField.uint16("rmsg.magic", "Magic", base.HEX),
    version = ProtoField.uint8("rmsg.version", "Version", base.DEC),
    kind = ProtoField.uint8("rmsg.kind", "Kind", base.DEC, KINDS),
    flags = ProtoField.uint16("rmsg.flags", "Flags", base.HEX),
    f_ack_now = ProtoField.bool("rmsg.flags.ack_now", "ACK_NOW", 16, nil, F_ACK_NOW),
    f_ack = ProtoField.bool("rmsg.flags.ack", "ACK (ack fields valid)", 16, nil, F_ACK),
    f_control = ProtoField.bool("rmsg.flags.control", "CONTROL", 16, nil, F_CONTROL),
    f_cookie = ProtoField.bool("rmsg.flags.cookie", "COOKIE", 16, nil, F_COOKIE),
    f_nested = ProtoField.bool("rmsg.flags.nested", "NESTED", 16, nil, F_NESTED),
    f_auth = ProtoField.bool("rmsg.flags.authenticated", "AUTHENTICATED", 16, nil,
        F_AUTHENTICATED),
    f_enc = ProtoField.bool("rmsg.flags.encrypted", "ENCRYPTED", 16, nil, F_ENCRYPTED),
    window = ProtoField.uint16("rmsg.window", "Window (packets beyond ack)", base.DEC),
    src_inc = ProtoField.uint64("rmsg.src_incarnation", "Source incarnation", base.HEX),
    dst_inc = ProtoField.uint64("rmsg.dst_incarnation", "Destination incarnation", base.HEX),
    ack = ProtoField.uint32("rmsg.ack", "Cumulative ack", base.DEC),
    fence = ProtoField.uint32("rmsg.fence", "Fence (dropped below this seq)", base.DEC),
    ack_delay = ProtoField.uint16("rmsg.ack_delay", "Ack delay (10 us units)", base.DEC),
    ack_delay_us = ProtoField.uint32("rmsg.ack_delay_us", "Ack delay (us)", base.DEC),
    n_sack = ProtoField.uint8("rmsg.n_sack", "SACK ranges", base.DEC),
    n_notice = ProtoField.uint8("rmsg.n_notice", "Verdict notices", base.DEC),
    pn = ProtoField.uint64("rmsg.packet_number", "Packet number", base.DEC),
    cookie = ProtoField.bytes("rmsg.cookie", "Cookie"),
    sack = ProtoField.none("rmsg.sack", "SACK range"),
    sack_start = ProtoField.uint32("rmsg.sack.start", "Start", base.DEC),
    sack_end = ProtoField.uint32("rmsg.sack.end", "End (exclusive)", base.DEC),
    notice = ProtoField.none("rmsg.notice", "Verdict notice"),
    notice_msg = ProtoField.uint32("rmsg.notice.msg_id", "Message id", base.DEC),
    notice_verdict = ProtoField.uint8("rmsg.notice.verdict", "Verdict", base.DEC, VERDICTS),
    group_len = ProtoField.uint8("rmsg.group_len", "Group name length", base.DEC),
    group = ProtoField.string("rmsg.group", "Group"),
    n_frag = ProtoField.uint32("rmsg.fragments", "Fragments in datagram", base.DEC),
    frag = ProtoField.none("rmsg.frag", "Fragment"),
    seq = ProtoField.uint32("rmsg.frag.seq", "Sequence number", base.DEC),
    fbase = ProtoField.uint32("rmsg.frag.base", "Base", base.DEC),
    msg_id = ProtoField.uint32("rmsg.frag.msg_id", "Message id", base.DEC),
    index = ProtoField.uint32("rmsg.frag.index", "Fragment index (0-based)", base.DEC),
    count = ProtoField.uint32("rmsg.frag.count", "Fragment count", base.DEC),
    number = ProtoField.uint32("rmsg.frag.number", "Fragment number (1-based)", base.DEC),
    total_len = ProtoField.uint32("rmsg.frag.total_len", "Message length", base.DEC),
    msg_type = ProtoField.int32("rmsg.frag.msg_type", "Message type", base.DEC),
    priority = ProtoField.uint16("rmsg.frag.priority", "Priority", base.DEC),
    mailbox_len = ProtoField.uint8("rmsg.frag.mailbox_len", "Mailbox name length", base.DEC),
    mailbox = ProtoField.string("rmsg.frag.mailbox", "Mailbox"),
    payload_len = ProtoField.uint16("rmsg.frag.payload_len", "Payload length", base.DEC),
    payload = ProtoField.bytes("rmsg.frag.payload", "Payload"),
    refusal = ProtoField.uint8("rmsg.refusal", "Refusal", base.DEC, REFUSALS),
    probe = ProtoField.uint32("rmsg.probe", "Probe number", base.DEC),
    padding = ProtoField.bytes("rmsg.padding", "Probe padding"),
    ciphertext = ProtoField.bytes("rmsg.ciphertext", "Encrypted body"),
    tag = ProtoField.bytes("rmsg.tag", "Tag"),
    crc = ProtoField.uint32("rmsg.crc", "CRC-32", base.HEX),
    crc_good = ProtoField.bool("rmsg.crc.good", "CRC-32 good"),
    retx = ProtoField.bool("rmsg.retransmission", "Retransmission"),
}
rmsg.fields = {}
for _, field in pairs(pf) do
    table.insert(rmsg.fields, field)
end

local ex = {
    bad_crc = ProtoExpert.new("rmsg.crc.bad", "CRC-32 mismatch: corrupted on the way",
        expert.group.CHECKSUM, expert.severity.ERROR),
    malformed = ProtoExpert.new("rmsg.malformed", "Malformed rmsg packet",
        expert.group.MALFORMED, expert.severity.ERROR),
    retx = ProtoExpert.new("rmsg.retransmission.expert", "Retransmission",
        expert.group.SEQUENCE, expert.severity.NOTE),
    dropped = ProtoExpert.new("rmsg.dropped.expert",
        "DROPPED: the peer lost session state; messages below the fence fail",
        expert.group.SEQUENCE, expert.severity.WARN),
}
rmsg.experts = { ex.bad_crc, ex.malformed, ex.retx, ex.dropped }

-- CRC-32 (IEEE, zlib's), table driven
local CRC_TABLE = {}
for i = 0, 255 do
    local c = i
    for _ = 1, 8 do
        if bit32.band(c, 1) == 1 then
            c = bit32.bxor(0xEDB88320, bit32.rshift(c, 1))
        else
            c = bit32.rshift(c, 1)
        end
    end
    CRC_TABLE[i] = c
end

local function crc32(bytes)
    local crc = 0xFFFFFFFF
    for i = 1, #bytes do
        local b = string.byte(bytes, i)
        crc = bit32.bxor(CRC_TABLE[bit32.band(bit32.bxor(crc, b), 0xFF)], bit32.rshift(crc, 8))
    end
    return bit32.bnot(crc)
end

-- (source address, source incarnation, seq) of every DATA fragment seen, on the first pass
local seen = {}
local retransmitted = {}

function rmsg.init()
    seen = {}
    retransmitted = {}
end

local function looks_like_rmsg(tvb)
    if tvb:len() < HEADER + 4 then
        return false
    end
    if tvb(0, 2):uint() ~= MAGIC or tvb(2, 1):uint() ~= VERSION then
        return false
    end
    if KINDS[tvb(3, 1):uint()] == nil then
        return false
    end
    return bit32.band(tvb(4, 2):uint(), bit32.bnot(KNOWN_FLAGS)) == 0
end

-- One fragment record at offset; returns the offset after it, or nil if it overruns.
local function fragment(tvb, tree, offset, stop, pinfo, notes, src_inc)
    if offset + 31 + 2 > stop then
        return nil
    end
    local mailbox_len = tvb(offset + 30, 1):uint()
    if offset + 31 + mailbox_len + 2 > stop then
        return nil
    end
    local payload_len = tvb(offset + 31 + mailbox_len, 2):uint()
    local size = 31 + mailbox_len + 2 + payload_len
    if offset + size > stop then
        return nil
    end
    local seq = tvb(offset, 4):uint()
    local index = tvb(offset + 12, 4):uint()
    local count = tvb(offset + 16, 4):uint()
    local sub = tree:add(pf.frag, tvb(offset, size))
    sub:add(pf.seq, tvb(offset, 4))
    sub:add(pf.fbase, tvb(offset + 4, 4))
    sub:add(pf.msg_id, tvb(offset + 8, 4))
    sub:add(pf.index, tvb(offset + 12, 4))
    sub:add(pf.count, tvb(offset + 16, 4))
    sub:add(pf.number, index + 1):set_generated()
    sub:add(pf.total_len, tvb(offset + 20, 4))
    sub:add(pf.msg_type, tvb(offset + 24, 4))
    sub:add(pf.priority, tvb(offset + 28, 2))
    sub:add(pf.mailbox_len, tvb(offset + 30, 1))
    local mailbox = ""
    if mailbox_len > 0 then
        sub:add_packet_field(pf.mailbox, tvb(offset + 31, mailbox_len), ENC_UTF_8)
        mailbox = tvb(offset + 31, mailbox_len):string(ENC_UTF_8)
    end
    sub:add(pf.payload_len, tvb(offset + 31 + mailbox_len, 2))
    if payload_len > 0 then
        sub:add(pf.payload, tvb(offset + 33 + mailbox_len, payload_len))
    end
    sub:set_text(string.format("Fragment seq=%u msg=%u frag=%u/%u len=%u/%u%s", seq,
        tvb(offset + 8, 4):uint(), index + 1, count, payload_len,
        tvb(offset + 20, 4):uint(), mailbox ~= "" and (" mailbox=" .. mailbox) or ""))
    if #notes == 0 then
        table.insert(notes, string.format("seq=%u msg=%u frag=%u/%u", seq,
            tvb(offset + 8, 4):uint(), index + 1, count))
    end
    if not pinfo.visited then
        local key = tostring(pinfo.src) .. ":" .. pinfo.src_port .. "/" .. src_inc .. "/" .. seq
        if seen[key] then
            retransmitted[pinfo.number] = true
        end
        seen[key] = true
    end
    return offset + size
end

function rmsg.dissector(tvb, pinfo, tree)
    if not looks_like_rmsg(tvb) then
        return 0
    end
    local len = tvb:len()
    pinfo.cols.protocol = "RMSG"
    local root = tree:add(rmsg, tvb())
    local kind = tvb(3, 1):uint()
    local flags = tvb(4, 2):uint()
    local sealed = bit32.band(flags, F_AUTHENTICATED + F_ENCRYPTED) ~= 0
    local encrypted = bit32.band(flags, F_ENCRYPTED) ~= 0
    local src_inc = tvb(8, 8):uint64()
    local info = { KINDS[kind] }

    root:add(pf.magic, tvb(0, 2))
    root:add(pf.version, tvb(2, 1))
    root:add(pf.kind, tvb(3, 1))
    local ft = root:add(pf.flags, tvb(4, 2))
    ft:add(pf.f_ack_now, tvb(4, 2))
    ft:add(pf.f_ack, tvb(4, 2))
    ft:add(pf.f_control, tvb(4, 2))
    ft:add(pf.f_cookie, tvb(4, 2))
    ft:add(pf.f_nested, tvb(4, 2))
    ft:add(pf.f_auth, tvb(4, 2))
    ft:add(pf.f_enc, tvb(4, 2))
    root:add(pf.window, tvb(6, 2))
    root:add(pf.src_inc, tvb(8, 8))
    root:add(pf.dst_inc, tvb(16, 8))
    root:add(pf.ack, tvb(24, 4))
    if kind == 8 then
        root:add(pf.fence, tvb(24, 4)):set_generated()
        root:add_proto_expert_info(ex.dropped)
    end
    root:add(pf.ack_delay, tvb(28, 2))
    root:add(pf.ack_delay_us, tvb(28, 2):uint() * 10):set_generated()
    root:add(pf.n_sack, tvb(30, 1))
    root:add(pf.n_notice, tvb(31, 1))

    -- the trailer first: everything else is read only up to it
    local stop = len - 4
    local crc_item = root:add(pf.crc, tvb(stop, 4))
    local good = crc32(tvb:raw(0, stop)) == tvb(stop, 4):uint()
    root:add(pf.crc_good, good):set_generated()
    if not good then
        crc_item:add_proto_expert_info(ex.bad_crc)
        table.insert(info, "[BAD CRC]")
    end

    local offset = HEADER
    if sealed then
        if len < HEADER + 8 + TAG + 4 then
            root:add_proto_expert_info(ex.malformed, "sealed datagram too short")
            pinfo.cols.info = table.concat(info, " ")
            return len
        end
        root:add(pf.pn, tvb(offset, 8))
        table.insert(info, (encrypted and "ENCRYPTED" or "AUTHENTICATED") .. " pn="
            .. tostring(tvb(offset, 8):uint64()))
        offset = offset + 8
        stop = stop - TAG
        root:add(pf.tag, tvb(stop, TAG))
    end
    if encrypted then
        if stop > offset then
            root:add(pf.ciphertext, tvb(offset, stop - offset))
        end
        pinfo.cols.info = table.concat(info, " ")
        return len
    end

    local ok = true
    local function malformed(why)
        root:add_proto_expert_info(ex.malformed, why)
        table.insert(info, "[MALFORMED: " .. why .. "]")
        ok = false
    end

    if bit32.band(flags, F_COOKIE) ~= 0 then
        if offset + COOKIE > stop then
            malformed("cookie overruns the datagram")
        else
            root:add(pf.cookie, tvb(offset, COOKIE))
            offset = offset + COOKIE
            table.insert(info, "COOKIE")
        end
    end
    local n_sack, n_notice = tvb(30, 1):uint(), tvb(31, 1):uint()
    if ok and offset + 8 * n_sack + 5 * n_notice > stop then
        malformed("ack section overruns the datagram")
    end
    local frag_notes = {}
    local sack_text, notice_text = {}, {}
    if ok then
        for _ = 1, n_sack do
            local s, e = tvb(offset, 4):uint(), tvb(offset + 4, 4):uint()
            local st = root:add(pf.sack, tvb(offset, 8))
            st:add(pf.sack_start, tvb(offset, 4))
            st:add(pf.sack_end, tvb(offset + 4, 4))
            st:set_text(string.format("SACK %u-%u", s, e - 1))
            table.insert(sack_text, string.format("%u-%u", s, e - 1))
            offset = offset + 8
        end
        for _ = 1, n_notice do
            local m, v = tvb(offset, 4):uint(), tvb(offset + 4, 1):uint()
            local nt = root:add(pf.notice, tvb(offset, 5))
            nt:add(pf.notice_msg, tvb(offset, 4))
            nt:add(pf.notice_verdict, tvb(offset + 4, 1))
            nt:set_text(string.format("Notice msg=%u %s", m, VERDICTS[v] or tostring(v)))
            table.insert(notice_text, string.format("%u:%s", m, VERDICTS[v] or tostring(v)))
            offset = offset + 5
        end
    end
    if ok and kind >= 16 then
        if offset >= stop then
            malformed("group name missing")
        else
            local glen = tvb(offset, 1):uint()
            root:add(pf.group_len, tvb(offset, 1))
            if glen == 0 or offset + 1 + glen > stop then
                malformed("group name empty or overruns the datagram")
            else
                root:add_packet_field(pf.group, tvb(offset + 1, glen), ENC_UTF_8)
                table.insert(info, "group=" .. tvb(offset + 1, glen):string(ENC_UTF_8))
                offset = offset + 1 + glen
            end
        end
    end
    if ok and (kind == 1 or kind == 16) then
        local n = 0
        while ok and offset < stop do
            local after = fragment(tvb, root, offset, stop, pinfo, frag_notes, tostring(src_inc))
            if after == nil then
                malformed("fragment record overruns the datagram")
            else
                offset = after
                n = n + 1
            end
        end
        if n == 0 and ok then
            malformed("DATA without a fragment")
        end
        root:add(pf.n_frag, n):set_generated()
        table.insert(info, frag_notes[1])
        if n > 1 then
            table.insert(info, string.format("+%d bundled", n - 1))
        end
        if bit32.band(flags, F_CONTROL) ~= 0 then
            table.insert(info, "CONTROL")
        end
        if bit32.band(flags, F_NESTED) ~= 0 then
            table.insert(info, "NESTED")
        end
    elseif ok and kind == 7 then
        if offset + 1 ~= stop then
            malformed("AUTH_FAILED carries one byte")
        else
            root:add(pf.refusal, tvb(offset, 1))
            table.insert(info, "refusal=" .. (REFUSALS[tvb(offset, 1):uint()] or "?"))
        end
    elseif ok and (kind == 9 or kind == 10) then
        if offset + 4 > stop or (kind == 10 and offset + 4 ~= stop) then
            malformed(KINDS[kind] .. " carries a 4-byte probe number")
        else
            root:add(pf.probe, tvb(offset, 4))
            table.insert(info, string.format("probe=%u", tvb(offset, 4):uint()))
            if kind == 9 then
                if offset + 4 < stop then
                    root:add(pf.padding, tvb(offset + 4, stop - offset - 4))
                end
                table.insert(info, string.format("size=%u", len))
            end
        end
    elseif ok and offset ~= stop then
        malformed(string.format("%d trailing bytes", stop - offset))
    end
    if kind == 8 then
        table.insert(info, string.format("fence=%u", tvb(24, 4):uint()))
    elseif bit32.band(flags, F_ACK) ~= 0 then
        table.insert(info, string.format("ack=%u win=%u", tvb(24, 4):uint(), tvb(6, 2):uint()))
    end
    if #sack_text > 0 then
        table.insert(info, "sack=" .. table.concat(sack_text, ","))
    end
    if #notice_text > 0 then
        table.insert(info, "verdict=" .. table.concat(notice_text, ","))
    end
    if bit32.band(flags, F_ACK_NOW) ~= 0 then
        table.insert(info, "ACK_NOW")
    end
    if retransmitted[pinfo.number] then
        root:add(pf.retx, true):set_generated()
        root:add_proto_expert_info(ex.retx)
        table.insert(info, "RETX")
    end
    pinfo.cols.info = table.concat(info, " ")
    return len
end

local function heuristic(tvb, pinfo, tree)
    if not looks_like_rmsg(tvb) then
        return false
    end
    -- the rest of this conversation is rmsg too, even where a port dissector
    -- (AFS on 7000, say) would claim a datagram the heuristic never saw
    pinfo.conversation = rmsg
    rmsg.dissector(tvb, pinfo, tree)
    return true
end

rmsg:register_heuristic("udp", heuristic)
local udp_port = DissectorTable.get("udp.port")
udp_port:add(7431, rmsg)
