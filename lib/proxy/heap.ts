/**
 * A binary min-heap whose items know their own position, so a load change is an
 * O(log n) sift instead of a rebuild (the original proxy rebuilt its heap list on
 * every update).
 */

/** An item that can sit in one {@link IndexedHeap}; `heapIndex` is -1 when outside. */
export interface HeapSlot {
  heapIndex: number;
}

/** Min-heap of {@link HeapSlot} items with O(log n) update and removal of any item. */
export class IndexedHeap<T extends HeapSlot> {
  private readonly items: T[] = [];

  /** `before(a, b)` is true when `a` must come out before `b`. */
  constructor(private readonly before: (a: T, b: T) => boolean) {}

  get size(): number {
    return this.items.length;
  }

  /** The first item, without removing it. */
  peek(): T | undefined {
    return this.items[0];
  }

  has(item: T): boolean {
    return item.heapIndex >= 0 && this.items[item.heapIndex] === item;
  }

  push(item: T): void {
    if (this.has(item)) return;
    item.heapIndex = this.items.length;
    this.items.push(item);
    this.up(item.heapIndex);
  }

  remove(item: T): void {
    if (!this.has(item)) return;
    const i = item.heapIndex;
    const last = this.items.pop()!;
    item.heapIndex = -1;
    if (last === item) return;
    this.items[i] = last;
    last.heapIndex = i;
    this.update(last);
  }

  /** Restores order after `item`'s key changed. */
  update(item: T): void {
    if (!this.has(item)) return;
    this.down(this.up(item.heapIndex));
  }

  /** All items, in no particular order. */
  values(): readonly T[] {
    return this.items;
  }

  private up(i: number): number {
    const items = this.items;
    const item = items[i];
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.before(item, items[parent])) break;
      items[i] = items[parent];
      items[i].heapIndex = i;
      i = parent;
    }
    items[i] = item;
    item.heapIndex = i;
    return i;
  }

  private down(i: number): void {
    const items = this.items;
    const item = items[i];
    const n = items.length;
    for (;;) {
      let child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && this.before(items[child + 1], items[child])) child++;
      if (!this.before(items[child], item)) break;
      items[i] = items[child];
      items[i].heapIndex = i;
      i = child;
    }
    items[i] = item;
    item.heapIndex = i;
  }
}
