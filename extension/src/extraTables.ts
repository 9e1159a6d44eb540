/** Any further tables the report carries (title, columns, rows), shown as plain tables. */

import { element } from './dom';
import { formatCell } from './format';
import { IExtraTable } from './report';

export function renderExtraTable(title: string, table: IExtraTable): HTMLElement {
  const root = element('div', 'jp-WorkbenchReport-extra');
  root.appendChild(element('h4', 'jp-WorkbenchReport-sectionTitle', title));
  const scroller = element('div', 'jp-WorkbenchReport-scroll');
  const node = element('table', 'jp-WorkbenchReport-table');
  const head = element('tr');
  for (const column of table.columns) {
    head.appendChild(element('th', undefined, column));
  }
  const thead = element('thead');
  thead.appendChild(head);
  const tbody = element('tbody');
  for (const row of table.rows) {
    const tr = element('tr');
    for (const value of row) {
      tr.appendChild(
        element('td', typeof value === 'number' ? 'jp-mod-numeric' : undefined, formatCell(value))
      );
    }
    tbody.appendChild(tr);
  }
  node.appendChild(thead);
  node.appendChild(tbody);
  scroller.appendChild(node);
  root.appendChild(scroller);
  return root;
}
