// The control-plane frame format: 12-byte header + JSON body, decoded
// incrementally from whatever chunks the socket delivers.
import { expect, test } from 'vitest';
import { encodeFrame, FrameDecoder, HEADER_BYTES, MAGIC, MAX_BODY, MessageType, WIRE_VERSION } from '../../lib/meta/wire.js';
import { expectCode } from '../helpers.js';

const body = { name: 'engine-1', regions: [{ id: 1, length: 4096, kind: 'host', shm: '/epdx-1-2-3-4' }], text: 'ünïcödé ✓' };

test('a frame carries magic, version, type and body length in its header', () => {
  const f = encodeFrame(MessageType.Segment, body);
  expect(f.readUInt32BE(0)).toBe(MAGIC);
  expect(f.subarray(0, 4).toString('latin1')).toBe('EPDX');
  expect(f.readUInt16BE(4)).toBe(WIRE_VERSION);
  expect(f.readUInt16BE(6)).toBe(MessageType.Segment);
  expect(f.readUInt32BE(8)).toBe(f.length - HEADER_BYTES);
  expect(JSON.parse(f.subarray(HEADER_BYTES).toString('utf8'))).toEqual(body);
});

test('frames round-trip, with the version they were sent in', () => {
  const frames = new FrameDecoder().push(Buffer.concat([encodeFrame(MessageType.Hello, { version: 1 }), encodeFrame(MessageType.Error, { code: 'X' }, 99)]));
  expect(frames).toEqual([
    { version: WIRE_VERSION, type: MessageType.Hello, body: { version: 1 } },
    { version: 99, type: MessageType.Error, body: { code: 'X' } },
  ]);
});

test('a stream cut at every possible byte boundary decodes to the same frames', () => {
  const stream = Buffer.concat([encodeFrame(MessageType.Segment, body), encodeFrame(MessageType.GetSegment, {}), encodeFrame(MessageType.Hello, null)]);
  const whole = new FrameDecoder().push(stream);
  expect(whole).toHaveLength(3);
  for (let cut = 1; cut < stream.length; cut++) {
    const d = new FrameDecoder();
    expect([...d.push(stream.subarray(0, cut)), ...d.push(stream.subarray(cut))]).toEqual(whole);
  }
  const d = new FrameDecoder();
  const one = [...stream].flatMap((b) => d.push(Buffer.from([b])));
  expect(one).toEqual(whole);
});

test('an incomplete frame yields nothing until the rest arrives', () => {
  const f = encodeFrame(MessageType.Hello, { version: 1 });
  const d = new FrameDecoder();
  expect(d.push(f.subarray(0, HEADER_BYTES))).toEqual([]);
  expect(d.push(f.subarray(HEADER_BYTES, f.length - 1))).toEqual([]);
  expect(d.push(f.subarray(f.length - 1))).toHaveLength(1);
});

test('bad magic is ERR_PROTOCOL', async () => {
  await expectCode(() => new FrameDecoder().push(Buffer.from('GET / HTTP/1.1\r\n\r\n')), 'ERR_PROTOCOL');
});

test('a body length over the limit is ERR_PROTOCOL before the body arrives', async () => {
  const header = encodeFrame(MessageType.Hello, {}).subarray(0, HEADER_BYTES);
  header.writeUInt32BE(MAX_BODY + 1, 8);
  await expectCode(() => new FrameDecoder().push(header), 'ERR_PROTOCOL');
});

test('a body that is not JSON is ERR_PROTOCOL', async () => {
  const f = encodeFrame(MessageType.Hello, 'abc');
  f.write('{ab', HEADER_BYTES);
  await expectCode(() => new FrameDecoder().push(f), 'ERR_PROTOCOL');
});

test('encoding a body over the limit is ERR_PROTOCOL', async () => {
  await expectCode(() => encodeFrame(MessageType.Segment, 'x'.repeat(MAX_BODY)), 'ERR_PROTOCOL');
});

test('an empty (null) body is a valid frame', () => {
  expect(new FrameDecoder().push(encodeFrame(MessageType.GetSegment, undefined))).toEqual([{ version: WIRE_VERSION, type: MessageType.GetSegment, body: null }]);
});
