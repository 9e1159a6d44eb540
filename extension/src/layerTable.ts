/**
 * The per-layer table: click a column header to sort by it (again to reverse), type in
 * the box to keep only the layers whose name contains the text. SQNR cells are coloured
 * from bad (red) to good (green); layers kept in FP32 are marked. The default columns fit
 * a 1400 px window with the sidebar open; the "Columns" chooser shows the others. Long
 * layer names are shortened in the middle, the full name on hover.
 */

import { append, element } from './dom';
import {
  formatCell,
  formatDb,
  isNumber,
  MISSING,
  shortenMiddle,
  significant,
  SQNR_GOOD_DB,
  SQNR_POOR_DB,
  sqnrBand
} from './format';
import { ILayerRow } from './report';

type SortValue = number | string | null;

/** Layer names longer than this are shortened in the middle in the table. */
export const TABLE_NAME_CHARS = 30;

interface IColumn {
  id: string;
  label: string;
  title: string;
  numeric: boolean;
  /** Hidden until chosen in the column chooser (the defaults fit 1400 px). */
  optional?: boolean;
  /** Offered only when some row has a value (SmoothQuant's column). */
  whenPresent?: boolean;
  /** Colour the cell on the SQNR scale. */
  sqnr?: boolean;
  value(row: ILayerRow): SortValue;
  text(row: ILayerRow): string;
}

function numberOrNull(value: number | null | undefined): number | null {
  return isNumber(value) ? value : null;
}

function textColumn(id: keyof ILayerRow, label: string, title: string): IColumn {
  return {
    id,
    label,
    title,
    numeric: false,
    value: row => (row[id] === null || row[id] === undefined ? null : String(row[id])),
    text: row => formatCell(row[id])
  };
}

function sqnrColumn(id: keyof ILayerRow, label: string, title: string): IColumn {
  return {
    id,
    label,
    title,
    numeric: true,
    sqnr: true,
    value: row => numberOrNull(row[id] as number | null | undefined),
    text: row => formatDb(row[id] as number | null | undefined)
  };
}

export const LAYER_COLUMNS: IColumn[] = [
  textColumn('layer', 'Layer', 'Module name in the model'),
  textColumn('type', 'Type', 'Module type'),
  {
    id: 'status',
    label: 'Status',
    title: 'Quantized, kept at a higher precision, or kept in FP32 (hover for the reason)',
    numeric: false,
    value: row => `${row.status} ${row.precision || ''} ${row.reason || ''}`,
    text: row =>
      row.status === 'fp32' ? (isFolded(row) ? 'folded' : 'FP32') : row.precision || 'quantized'
  },
  { ...textColumn('scheme', 'Scheme', 'Weight quantization scheme'), optional: true },
  {
    id: 'bits',
    label: 'Bits',
    title: 'Weight bits',
    numeric: true,
    value: row => numberOrNull(row.bits),
    text: row => formatCell(row.bits)
  },
  {
    id: 'activation_bits',
    label: 'Act. bits',
    title: 'Input activation bits (empty: FP32 input)',
    numeric: true,
    value: row => numberOrNull(row.activation_bits),
    text: row => formatCell(row.activation_bits)
  },
  sqnrColumn('weight_sqnr_db', 'Weight SQNR', 'Quantized weights against FP32 weights'),
  sqnrColumn('layer_sqnr_db', 'Layer SQNR', 'The quantized layer alone, fed the FP32 input'),
  sqnrColumn(
    'output_sqnr_db',
    'Output SQNR',
    "The layer's output in the quantized model against the FP32 model (earlier errors included)"
  ),
  {
    id: 'output_cosine',
    label: 'Cosine',
    title: 'Cosine similarity of the layer output to FP32',
    numeric: true,
    value: row => numberOrNull(row.output_cosine),
    text: row => (isNumber(row.output_cosine) ? row.output_cosine.toFixed(3) : MISSING)
  },
  {
    id: 'num_scales',
    optional: true,
    label: 'Scales',
    title: 'Number of weight scales (one per channel when per-channel)',
    numeric: true,
    value: row => numberOrNull(row.num_scales),
    text: row => formatCell(row.num_scales)
  },
  {
    id: 'scale_range',
    optional: true,
    label: 'Scale range',
    title: 'Smallest and largest weight scale (sorted by the largest)',
    numeric: true,
    value: row => numberOrNull(row.scale_max),
    text: row =>
      isNumber(row.scale_min) && isNumber(row.scale_max)
        ? `${significant(row.scale_min)} \u2026 ${significant(row.scale_max)}`
        : MISSING
  },
  { ...textColumn('zero_point', 'Zero point', 'Weight zero point(s)'), optional: true },
  {
    ...textColumn(
      'smoothing',
      'Smoothing',
      'SmoothQuant: where 1/s went (layernorm, linear or mul) and alpha, or why not smoothed'
    ),
    whenPresent: true // shown when SmoothQuant ran
  }
];

/** A layer kept in FP32 because it was folded away (BatchNorm into the conv before it). */
export function isFolded(row: ILayerRow): boolean {
  return row.status === 'fp32' && (!!row.folded_into || row.precision === 'folded');
}

function compare(a: SortValue, b: SortValue, numeric: boolean): number {
  if (numeric) {
    return (a as number) - (b as number);
  }
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

export type SortDirection = 'ascending' | 'descending';

export class LayerTable {
  readonly node: HTMLElement;
  private readonly rows: ILayerRow[];
  private readonly tbody: HTMLTableSectionElement;
  private readonly headers = new Map<string, HTMLTableCellElement>();
  private readonly count: HTMLElement;
  private readonly filterInput: HTMLInputElement;
  private readonly hideInput: HTMLInputElement;
  /** The table's own scroll area (bounded height, sticky header and first column). */
  readonly scroller: HTMLElement;
  private hidingFp32 = false;
  private sortColumn: IColumn | null = null;
  private sortDirection: SortDirection = 'ascending';
  private filterText = '';
  /** The columns this report offers, and the ones shown. */
  readonly columns: IColumn[];
  private readonly shown: Set<string>;

  constructor(rows: ILayerRow[]) {
    this.rows = rows;
    this.columns = LAYER_COLUMNS.filter(
      column =>
        !column.whenPresent ||
        rows.some(row => {
          const value = (row as unknown as Record<string, unknown>)[column.id];
          return value !== null && value !== undefined && value !== '';
        })
    );
    this.shown = new Set(this.columns.filter(column => !column.optional).map(column => column.id));
    this.node = element('div', 'jp-WorkbenchReport-layers');

    const toolbar = element('div', 'jp-WorkbenchReport-toolbar');
    this.filterInput = element('input', 'jp-WorkbenchReport-filter');
    this.filterInput.type = 'search';
    this.filterInput.placeholder = 'Filter layers by name';
    this.filterInput.setAttribute('aria-label', 'Filter layers by name');
    this.filterInput.addEventListener('input', () => {
      this.filterText = this.filterInput.value;
      this.update();
    });
    const worstFirst = element('button', 'jp-WorkbenchReport-worstFirst', 'Worst first');
    worstFirst.type = 'button';
    worstFirst.title = 'Sort by output SQNR, lowest first';
    worstFirst.addEventListener('click', () => this.sortBy('output_sqnr_db', 'ascending'));
    const hideLabel = element('label');
    this.hideInput = element('input', 'jp-WorkbenchReport-hideFp32');
    this.hideInput.type = 'checkbox';
    this.hideInput.addEventListener('change', () => this.hideFp32(this.hideInput.checked));
    append(hideLabel, this.hideInput, element('span', undefined, 'hide FP32 / folded'));
    this.count = element('span', 'jp-WorkbenchReport-count');
    append(
      toolbar,
      this.filterInput,
      worstFirst,
      hideLabel,
      this.renderChooser(),
      this.count,
      renderLegend()
    );
    this.node.appendChild(toolbar);

    const scroller = element('div', 'jp-WorkbenchReport-tableScroll');
    this.scroller = scroller;
    const table = element('table', 'jp-WorkbenchReport-table jp-WorkbenchReport-layerTable');
    const headRow = element('tr');
    for (const column of this.columns) {
      const th = element('th', column.numeric ? 'jp-mod-numeric' : undefined);
      th.dataset.column = column.id;
      th.title = `${column.title}. Click to sort.`;
      th.setAttribute('aria-sort', 'none');
      th.tabIndex = 0;
      append(
        th,
        element('span', 'jp-WorkbenchReport-headLabel', column.label),
        element('span', 'jp-WorkbenchReport-sortMark')
      );
      th.addEventListener('click', () => this.sortBy(column.id));
      th.addEventListener('keydown', event => {
        if (event.key === 'Enter' || event.key === ' ') {
          event.preventDefault();
          this.sortBy(column.id);
        }
      });
      this.headers.set(column.id, th);
      headRow.appendChild(th);
    }
    const thead = element('thead');
    thead.appendChild(headRow);
    this.tbody = element('tbody');
    append(table, thead, this.tbody);
    scroller.appendChild(table);
    this.node.appendChild(scroller);
    this.update();
  }

  /** The "Columns" chooser: a checkbox per column (the layer name always shows). */
  private renderChooser(): HTMLElement {
    const chooser = element('details', 'jp-WorkbenchReport-columns');
    const summary = element('summary', undefined, 'Columns');
    summary.title = 'Choose the columns to show';
    const list = element('div', 'jp-WorkbenchReport-columnList');
    for (const column of this.columns.filter(c => c.id !== 'layer')) {
      const label = element('label');
      const box = element('input');
      box.type = 'checkbox';
      box.checked = this.shown.has(column.id);
      box.dataset.column = column.id;
      box.addEventListener('change', () => this.showColumn(column.id, box.checked));
      append(label, box, element('span', undefined, column.label));
      label.title = column.title;
      list.appendChild(label);
    }
    append(chooser, summary, list);
    return chooser;
  }

  /** Show or hide a column. */
  showColumn(columnId: string, show: boolean): void {
    if (show) {
      this.shown.add(columnId);
    } else if (columnId !== 'layer') {
      this.shown.delete(columnId);
    }
    this.update();
  }

  /** The ids of the columns shown, in table order. */
  shownColumns(): string[] {
    return this.columns.filter(column => this.shown.has(column.id)).map(column => column.id);
  }

  /** Sort by a column; the same column again reverses the order. */
  sortBy(columnId: string, direction?: SortDirection): void {
    const column = this.columns.find(c => c.id === columnId);
    if (!column) {
      return;
    }
    if (direction) {
      this.sortDirection = direction;
    } else if (this.sortColumn === column) {
      this.sortDirection = this.sortDirection === 'ascending' ? 'descending' : 'ascending';
    } else {
      this.sortDirection = 'ascending';
    }
    this.sortColumn = column;
    this.update();
  }

  /** Keep only the layers whose name contains ``text`` (case-insensitive). */
  filter(text: string): void {
    this.filterInput.value = text;
    this.filterText = text;
    this.update();
  }

  /** Show only the quantized layers (or all again). */
  hideFp32(hide: boolean): void {
    this.hideInput.checked = hide;
    this.hidingFp32 = hide;
    this.update();
  }

  /** The rows shown, in display order. */
  visibleRows(): ILayerRow[] {
    const needle = this.filterText.trim().toLowerCase();
    const indexed = this.rows
      .map((row, index) => ({ row, index }))
      .filter(({ row }) => !needle || String(row.layer).toLowerCase().includes(needle))
      .filter(({ row }) => !this.hidingFp32 || row.status === 'quantized');
    const column = this.sortColumn;
    if (column) {
      const sign = this.sortDirection === 'ascending' ? 1 : -1;
      indexed.sort((a, b) => {
        const va = column.value(a.row);
        const vb = column.value(b.row);
        // missing values go last whichever the direction
        if (va === null || vb === null) {
          return va === vb ? a.index - b.index : va === null ? 1 : -1;
        }
        return sign * compare(va, vb, column.numeric) || a.index - b.index;
      });
    }
    return indexed.map(({ row }) => row);
  }

  private update(): void {
    for (const [id, th] of this.headers) {
      th.hidden = !this.shown.has(id);
      const active = this.sortColumn !== null && this.sortColumn.id === id;
      th.setAttribute('aria-sort', active ? this.sortDirection : 'none');
      const mark = th.querySelector('.jp-WorkbenchReport-sortMark');
      if (mark) {
        mark.textContent = active ? (this.sortDirection === 'ascending' ? ' \u25b2' : ' \u25bc') : '';
      }
    }
    const visible = this.visibleRows();
    const columns = this.columns.filter(column => this.shown.has(column.id));
    this.tbody.replaceChildren(...visible.map(row => renderRow(row, columns)));
    this.count.textContent = `${visible.length} of ${this.rows.length} layers`;
  }
}

function renderRow(row: ILayerRow, columns: IColumn[]): HTMLTableRowElement {
  const tr = element('tr', row.status === 'fp32' ? 'jp-WorkbenchReport-fp32' : undefined);
  tr.dataset.status = row.status;
  tr.dataset.layer = row.layer;
  for (const column of columns) {
    const td = element('td', column.numeric ? 'jp-mod-numeric' : undefined);
    td.dataset.column = column.id;
    if (column.id === 'layer') {
      const name = element('code', 'jp-WorkbenchReport-layerName', shortenMiddle(row.layer, TABLE_NAME_CHARS));
      name.title = row.layer;
      td.appendChild(name);
    } else if (column.id === 'status') {
      const folded = isFolded(row);
      const quantized = row.status !== 'fp32';
      const badge = element(
        'span',
        `jp-WorkbenchReport-badge${quantized ? ' jp-mod-quantized' : folded ? ' jp-mod-folded' : ''}`,
        column.text(row)
      );
      td.appendChild(badge);
      if (quantized && row.reason && (row.precision || 'quantized') !== 'quantized') {
        badge.title = row.reason; // why it is kept at a higher precision
      }
      if (!quantized && row.reason) {
        badge.title = row.reason;
        const marker = element('span', 'jp-WorkbenchReport-reason', '?');
        marker.title = row.reason;
        td.appendChild(marker);
      }
    } else {
      td.textContent = column.text(row);
    }
    const value = column.value(row);
    if (column.sqnr && typeof value === 'number') {
      td.classList.add(`jp-mod-${sqnrBand(value)}`);
    }
    tr.appendChild(td);
  }
  return tr;
}

function renderLegend(): HTMLElement {
  const legend = element('span', 'jp-WorkbenchReport-legend');
  legend.title = 'SQNR bands';
  const items: [string, string][] = [
    ['poor', `< ${SQNR_POOR_DB} dB`],
    ['fair', `${SQNR_POOR_DB}\u2013${SQNR_GOOD_DB} dB`],
    ['good', `\u2265 ${SQNR_GOOD_DB} dB`]
  ];
  legend.appendChild(element('span', undefined, 'SQNR: '));
  for (const [band, label] of items) {
    const swatch = element('span', 'jp-WorkbenchReport-swatch', label);
    swatch.style.background = `var(--wb-${band})`;
    legend.appendChild(swatch);
  }
  return legend;
}
