"""The C ring's layout and edge cases, with the ring's state set up directly (Agrona style):
each test starts the positions where it needs them, then checks bytes and positions."""

import struct
import time

import numpy as np
import pytest

from mpstream._mps import ffi, lib
from mpstream.channel import Channel, _Mapping

CAPACITY = 1024
HEADER = lib.MPS_RECORD_HEADER_LENGTH
RESERVE = lib.MPS_RING_CONTROL_RESERVE  # bytes a DATA record leaves free for control records
DATA = lib.MPS_RING_DATA_OFFSET
TAIL_OFFSET, HEAD_OFFSET = 128, 384  # producer and consumer lines, see csrc/mps_ring.h


class RawRing:
    """Both sides of one ring attached in this process, driven through the C API."""

    def __init__(self, channel: Channel):
        self.mapping = _Mapping.open(channel.name)
        self.bytes = np.frombuffer(self.mapping.buffer, np.uint8)
        self.producer = self._attach(lib.MPS_RING_PRODUCER)
        self.consumer = self._attach(lib.MPS_RING_CONSUMER)
        self.offset = ffi.new("uint64_t *")
        self.data = lib.mps_ring_data(self.producer)  # borrowed: valid while the handles live
        self.record = ffi.new("struct mps_record *")

    def _attach(self, side, spin_ns=0):
        out = ffi.new("struct mps_ring **")
        assert lib.mps_ring_attach(self.mapping.segment, side, spin_ns, 0, out) == lib.MPS_ATTACH_OK
        return ffi.gc(out[0], lib.mps_ring_free)

    def u64(self, offset):
        return struct.unpack_from("<Q", self.mapping.buffer, offset)[0]

    def header(self, index):
        """(payload length, type) of the record header at data index."""
        return struct.unpack_from("<II", self.mapping.buffer, DATA + index)

    def offer(self, length, fill=0xAB, kind=lib.MPS_RECORD_DATA):
        rc = lib.mps_ring_try_claim(self.producer, kind, length, self.offset)
        if rc == lib.MPS_RING_OK:
            ffi.memmove(self.data + self.offset[0], bytes([fill]) * length, length)
            assert lib.mps_ring_commit(self.producer) == lib.MPS_RING_OK
        return rc

    def poll(self):
        """(type, payload bytes) of the next record, released; or the result code."""
        rc = lib.mps_ring_try_peek(self.consumer, self.record)
        if rc != lib.MPS_RING_OK:
            return rc
        start = DATA + self.record.offset
        out = (self.record.type, bytes(self.bytes[start : start + self.record.length]))
        assert lib.mps_ring_release(self.consumer) == lib.MPS_RING_OK
        return out

    def close(self):
        ffi.release(self.producer)
        ffi.release(self.consumer)


@pytest.fixture
def ring_at(request):
    """ring_at(start_position, capacity=1024, max_records=0) -> RawRing, cleaned up after."""
    made = []

    def make(start_position=0, capacity=CAPACITY, max_records=0):
        channel = Channel(f"ring-test-{len(made)}", capacity, max_records, start_position=start_position)
        ring = RawRing(channel)
        made.append((channel, ring))
        return ring

    yield make
    for channel, ring in made:
        ring.close()
        channel.close()


def test_should_describe_layout_in_descriptor(ring_at):
    ring = ring_at()
    magic, version, _, capacity, max_records = struct.unpack_from("<QIIQQ", ring.mapping.buffer, 0)
    assert (magic, version, capacity, max_records) == (lib.MPS_RING_MAGIC, lib.MPS_RING_LAYOUT_VERSION, CAPACITY, 0)
    assert ring.mapping.length == DATA + CAPACITY


def test_should_report_empty_on_fresh_ring(ring_at):
    ring = ring_at()
    assert ring.poll() == lib.MPS_RING_EMPTY


def test_should_align_records_to_64_bytes(ring_at):
    ring = ring_at()
    assert ring.offer(1, fill=1) == lib.MPS_RING_OK
    assert ring.offer(57, fill=2) == lib.MPS_RING_OK  # 8 + 57 = 65 bytes -> two slots
    assert ring.u64(TAIL_OFFSET) == 64 + 128
    assert ring.header(0) == (1, lib.MPS_RECORD_DATA)
    assert ring.header(64) == (57, lib.MPS_RECORD_DATA)
    assert ring.poll() == (lib.MPS_RECORD_DATA, b"\x01")
    assert ring.poll() == (lib.MPS_RECORD_DATA, b"\x02" * 57)
    assert ring.u64(HEAD_OFFSET) == 192


def test_should_insert_padding_record_on_wrap(ring_at):
    ring = ring_at(start_position=CAPACITY - 64)  # one slot left before the end
    assert ring.offer(100, fill=7) == lib.MPS_RING_OK  # needs 128 bytes: does not fit
    assert ring.header(CAPACITY - 64) == (64 - HEADER, lib.MPS_RECORD_PADDING)
    assert ring.header(0) == (100, lib.MPS_RECORD_DATA)
    assert ring.u64(TAIL_OFFSET) == CAPACITY - 64 + 64 + 128
    assert ring.poll() == (lib.MPS_RECORD_DATA, bytes([7]) * 100)
    assert ring.u64(HEAD_OFFSET) == ring.u64(TAIL_OFFSET)


def test_should_not_pad_when_record_ends_exactly_at_wrap(ring_at):
    ring = ring_at(start_position=CAPACITY - 128)
    assert ring.offer(128 - HEADER, fill=3) == lib.MPS_RING_OK
    assert ring.header(CAPACITY - 128) == (128 - HEADER, lib.MPS_RECORD_DATA)
    assert ring.u64(TAIL_OFFSET) == CAPACITY
    assert ring.offer(1, fill=4) == lib.MPS_RING_OK
    assert ring.header(0) == (1, lib.MPS_RECORD_DATA)
    assert [ring.poll(), ring.poll()] == [(lib.MPS_RECORD_DATA, b"\x03" * 120), (lib.MPS_RECORD_DATA, b"\x04")]


def test_should_fill_exactly_to_capacity_then_refuse(ring_at):
    ring = ring_at(start_position=5 * CAPACITY + 320)  # positions far past the first lap
    slots, reserved = CAPACITY // 64, RESERVE // 64
    for i in range(slots - reserved):
        assert ring.offer(64 - HEADER, fill=i) == lib.MPS_RING_OK, i
    assert ring.offer(1) == lib.MPS_RING_FULL  # data leaves the reserve free
    for i in range(reserved):  # control records may take it
        assert ring.offer(64 - HEADER, fill=200 + i, kind=lib.MPS_RECORD_BARRIER) == lib.MPS_RING_OK
    assert ring.offer(1, kind=lib.MPS_RECORD_BARRIER) == lib.MPS_RING_FULL
    assert ring.u64(TAIL_OFFSET) - ring.u64(HEAD_OFFSET) == CAPACITY
    assert ring.poll() == (lib.MPS_RECORD_DATA, bytes([0]) * 56)
    assert ring.offer(1) == lib.MPS_RING_FULL
    assert ring.offer(64 - HEADER, fill=99, kind=lib.MPS_RECORD_BARRIER) == lib.MPS_RING_OK  # one slot freed, one used
    got = [ring.poll() for _ in range(slots)]
    assert got == ([(lib.MPS_RECORD_DATA, bytes([i]) * 56) for i in range(1, slots - reserved)]
                   + [(lib.MPS_RECORD_BARRIER, bytes([200 + i]) * 56) for i in range(reserved)]
                   + [(lib.MPS_RECORD_BARRIER, bytes([99]) * 56)])
    assert ring.poll() == lib.MPS_RING_EMPTY


def test_should_refuse_claim_that_needs_padding_beyond_free_space(ring_at):
    ring = ring_at(start_position=CAPACITY - 64)
    assert ring.offer(64 - HEADER) == lib.MPS_RING_OK  # fills the last slot; tail at wrap
    for _ in range((CAPACITY - RESERVE) // 64 - 2):
        assert ring.offer(64 - HEADER) == lib.MPS_RING_OK
    # one 64-byte slot free (beyond the reserve): a two-slot record cannot fit
    assert ring.offer(100) == lib.MPS_RING_FULL
    assert ring.offer(64 - HEADER) == lib.MPS_RING_OK


@pytest.mark.parametrize("start_slot", range(0, CAPACITY // 64, 3))
def test_should_accept_max_payload_from_any_position(ring_at, start_slot):
    ring = ring_at(start_position=start_slot * 64)
    max_payload = lib.mps_ring_max_payload_length(CAPACITY)
    assert max_payload == (CAPACITY - RESERVE) // 2 - HEADER
    assert ring.offer(max_payload + 1) == lib.MPS_RING_TOO_LARGE
    assert ring.offer(max_payload, fill=5) == lib.MPS_RING_OK
    assert ring.poll() == (lib.MPS_RECORD_DATA, bytes([5]) * max_payload)
    assert ring.offer(max_payload, fill=6) == lib.MPS_RING_OK  # also right after a large one
    assert ring.poll() == (lib.MPS_RECORD_DATA, bytes([6]) * max_payload)


def test_should_bound_records_in_flight_by_credits(ring_at):
    ring = ring_at(max_records=2)
    assert ring.offer(1) == lib.MPS_RING_OK
    assert ring.offer(1) == lib.MPS_RING_OK
    assert ring.offer(1) == lib.MPS_RING_FULL  # space left, but no credit
    assert ring.poll()[0] == lib.MPS_RECORD_DATA
    assert ring.offer(1) == lib.MPS_RING_OK


def test_should_not_count_padding_against_credits(ring_at):
    ring = ring_at(start_position=CAPACITY - 64, max_records=1)
    assert ring.offer(100) == lib.MPS_RING_OK  # padding + record: one record of credit
    assert ring.offer(1) == lib.MPS_RING_FULL
    assert ring.poll()[0] == lib.MPS_RECORD_DATA
    assert ring.offer(1) == lib.MPS_RING_OK


def test_should_publish_nothing_on_abort(ring_at):
    ring = ring_at(start_position=CAPACITY - 64)
    assert lib.mps_ring_try_claim(ring.producer, lib.MPS_RECORD_DATA, 100, ring.offset) == lib.MPS_RING_OK
    assert lib.mps_ring_abort(ring.producer) == lib.MPS_RING_OK
    assert ring.u64(TAIL_OFFSET) == CAPACITY - 64
    assert ring.poll() == lib.MPS_RING_EMPTY
    assert ring.offer(1, fill=8) == lib.MPS_RING_OK  # the slot before the wrap is still usable
    assert ring.header(CAPACITY - 64) == (1, lib.MPS_RECORD_DATA)


def test_should_copy_the_prefix_in_with_the_commit_across_a_wrap(ring_at):
    ring = ring_at(start_position=CAPACITY - 64)  # the record goes after padding, at index 0
    assert lib.mps_ring_try_claim(ring.producer, lib.MPS_RECORD_DATA, 100, ring.offset) == lib.MPS_RING_OK
    ffi.memmove(ring.data + ring.offset[0] + 8, bytes(range(92)), 92)  # the rest of the payload
    assert lib.mps_ring_commit_with(ring.producer, b"prefix!!", 8) == lib.MPS_RING_OK
    assert ring.header(0) == (100, lib.MPS_RECORD_DATA)
    assert ring.poll() == (lib.MPS_RECORD_DATA, b"prefix!!" + bytes(range(92)))


def test_should_refuse_a_prefix_longer_than_the_claim_and_keep_the_claim(ring_at):
    ring = ring_at()
    assert lib.mps_ring_try_claim(ring.producer, lib.MPS_RECORD_DATA, 4, ring.offset) == lib.MPS_RING_OK
    assert lib.mps_ring_commit_with(ring.producer, b"12345", 5) == lib.MPS_RING_BAD_STATE
    assert ring.poll() == lib.MPS_RING_EMPTY  # nothing published
    assert lib.mps_ring_commit_with(ring.producer, b"1234", 4) == lib.MPS_RING_OK
    assert ring.poll() == (lib.MPS_RECORD_DATA, b"1234")


def test_should_reject_calls_out_of_order(ring_at):
    ring = ring_at()
    assert lib.mps_ring_commit(ring.producer) == lib.MPS_RING_BAD_STATE
    assert lib.mps_ring_release(ring.consumer) == lib.MPS_RING_BAD_STATE
    assert lib.mps_ring_try_peek(ring.producer, ring.record) == lib.MPS_RING_BAD_STATE
    assert lib.mps_ring_try_claim(ring.consumer, 1, 1, ring.offset) == lib.MPS_RING_BAD_STATE
    assert ring.offer(1) == lib.MPS_RING_OK
    assert lib.mps_ring_try_peek(ring.consumer, ring.record) == lib.MPS_RING_OK
    assert lib.mps_ring_try_peek(ring.consumer, ring.record) == lib.MPS_RING_BAD_STATE  # one held at a time


def test_should_report_closed_to_producer_after_consumer_detaches(ring_at):
    ring = ring_at()
    for _ in range((CAPACITY - RESERVE) // 64):
        assert ring.offer(1) == lib.MPS_RING_OK
    ffi.release(ring.consumer)
    ring.consumer = ffi.gc(ffi.NULL, lambda _: None)
    assert ring.offer(1) == lib.MPS_RING_CLOSED


def test_should_time_out_a_blocking_peek_on_an_empty_ring(ring_at):
    ring = ring_at()
    assert lib.mps_ring_peek(ring.consumer, 1_000_000, ring.record, ffi.NULL) == lib.MPS_RING_TIMEOUT


def test_should_refuse_bad_capacity():
    with pytest.raises(ValueError, match="power of two"):
        Channel("bad", capacity=3000)


def test_should_spin_no_longer_than_the_timeout(ring_at):
    """A 20 ms peek of a handle that may spin a second returns in its 20 ms, spinning at most
    that long: its CPU time stays far below the second."""
    ring = ring_at()
    ffi.release(ring.consumer)
    ring.consumer = ring._attach(lib.MPS_RING_CONSUMER, spin_ns=1_000_000_000)
    start = time.thread_time()
    assert lib.mps_ring_peek(ring.consumer, 20_000_000, ring.record, ffi.NULL) == lib.MPS_RING_TIMEOUT
    assert time.thread_time() - start < 0.5
