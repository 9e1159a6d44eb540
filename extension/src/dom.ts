/**
 * DOM helpers that only ever set text: model-supplied names (a layer may be called
 * `<img src=x onerror=...>`) must never reach innerHTML.
 */

export function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className?: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

export function append(parent: HTMLElement, ...children: HTMLElement[]): HTMLElement {
  for (const child of children) {
    parent.appendChild(child);
  }
  return parent;
}
