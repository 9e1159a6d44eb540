/** The MIME renderer widget: summary, per-layer table, storage bars, further tables. */

import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

import { renderSqnrChart } from './chart';
import { element } from './dom';
import { renderExtraTable } from './extraTables';
import { LayerTable } from './layerTable';
import { ALL_SECTIONS, IReportBundle, REPORT_MIME_TYPE } from './report';
import { renderStorage } from './storageBars';
import { renderSummary } from './summary';

const SUPPORTED_SCHEMA_VERSION = 1;

/** The reason a bundle cannot be shown, or null when it can. */
export function bundleProblem(data: unknown): string | null {
  if (typeof data !== 'object' || data === null) {
    return 'the report is not a JSON object';
  }
  const bundle = data as Partial<IReportBundle>;
  if (bundle.schema_version !== SUPPORTED_SCHEMA_VERSION) {
    return (
      `report schema version ${String(bundle.schema_version)} is not supported by this ` +
      `extension (it shows version ${SUPPORTED_SCHEMA_VERSION}); upgrade quantization-workbench`
    );
  }
  if (!bundle.summary || !Array.isArray(bundle.layers) || !Array.isArray(bundle.storage)) {
    return 'the report lacks its summary, layers or storage';
  }
  return null;
}

export class ReportWidget extends Widget implements IRenderMime.IRenderer {
  private layerTable: LayerTable | null = null;

  constructor(options: IRenderMime.IRendererOptions) {
    super();
    this.mimeType = options.mimeType;
    this.addClass('jp-WorkbenchReport');
  }

  readonly mimeType: string;

  /** The per-layer table of the last rendered report (for scripting and tests). */
  get layers(): LayerTable | null {
    return this.layerTable;
  }

  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const data = model.data[this.mimeType || REPORT_MIME_TYPE];
    const problem = bundleProblem(data);
    if (problem) {
      this.layerTable = null;
      this.node.replaceChildren(
        element('div', 'jp-WorkbenchReport-error', `Cannot show the quantization report: ${problem}.`)
      );
      return Promise.resolve();
    }
    const bundle = data as unknown as IReportBundle;
    const wanted = new Set(bundle.sections && bundle.sections.length ? bundle.sections : ALL_SECTIONS);
    const table = new LayerTable(bundle.layers);
    this.layerTable = wanted.has('layers') ? table : null;
    const title = (text: string) => element('h4', 'jp-WorkbenchReport-sectionTitle', text);
    const sections: HTMLElement[] = [];
    if (wanted.has('summary')) {
      sections.push(renderSummary(bundle.summary, bundle.layers));
    }
    if (wanted.has('chart') && bundle.layers.length) {
      const select = (layer: string) => {
        table.filter(layer);
        table.node.scrollIntoView({ block: 'nearest' });
      };
      sections.push(title('Output SQNR per layer'), renderSqnrChart(bundle.layers, select));
    }
    if (wanted.has('layers')) {
      sections.push(title('Layers'), table.node);
    }
    if (wanted.has('storage')) {
      sections.push(title('Storage'), renderStorage(bundle.storage, bundle.layers));
    }
    if (wanted.has('tables')) {
      for (const [name, extra] of Object.entries(bundle.tables || {})) {
        sections.push(renderExtraTable(name, extra));
      }
    }
    this.node.replaceChildren(...sections);
    return Promise.resolve();
  }
}
