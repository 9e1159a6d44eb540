/**
 * The cells of a new quantization notebook: load the workbench, train the demo CNN briefly
 * on scikit-learn's bundled digits (no download), quantize it and show the report.
 */

type CellSource = string[];

interface INotebookCell {
  id: string;
  cell_type: 'markdown' | 'code';
  metadata: Record<string, unknown>;
  source: CellSource;
  execution_count?: null;
  outputs?: unknown[];
}

export interface INotebookContent {
  cells: INotebookCell[];
  metadata: Record<string, unknown>;
  nbformat: number;
  nbformat_minor: number;
}

function lines(text: string): CellSource {
  const parts = text.split('\n');
  return parts.map((line, index) => (index < parts.length - 1 ? `${line}\n` : line));
}

function markdown(id: string, text: string): INotebookCell {
  return { id, cell_type: 'markdown', metadata: {}, source: lines(text) };
}

function code(id: string, text: string): INotebookCell {
  return {
    id,
    cell_type: 'code',
    metadata: {},
    source: lines(text),
    execution_count: null,
    outputs: []
  };
}

export const INTRO_CELL = `# Quantize a model

Train the workbench's demo CNN on scikit-learn's bundled digits (8x8 images, no download),
quantize it to INT8 and look at every layer: its scheme, its error against FP32 (SQNR, cosine)
and the bytes it stores. To quantize your own model, replace \`model\`, \`calib\` (a DataLoader,
batches or a tensor) and \`test_accuracy\` in the second code cell.`;

export const SETUP_CELL = `import workbench as wb

%load_ext workbench`;

export const MODEL_CELL = `from workbench.demo import accuracy, load_digits_data, train_digits_cnn

data = load_digits_data()
model = train_digits_cnn(data, epochs=2)  # the demo CNN, trained briefly
calib = data.calib_batches(batches=4)  # calibration data: a list of input batches


def test_accuracy(m):
    """Top-1 accuracy (%) on the held-out digits."""
    return accuracy(m, data.test_x, data.test_y)


print(f"FP32 test accuracy: {test_accuracy(model):.1f}%")`;

export const QUANTIZE_CELL = `# The same as: res = wb.ptq(model, calib, config="int8", eval_fn=test_accuracy)
%quantize model --calib calib --eval test_accuracy -o res`;

export function starterNotebook(): INotebookContent {
  return {
    cells: [
      markdown('intro', INTRO_CELL),
      code('setup', SETUP_CELL),
      code('model', MODEL_CELL),
      code('quantize', QUANTIZE_CELL)
    ],
    metadata: {
      kernelspec: { display_name: 'Python 3 (ipykernel)', language: 'python', name: 'python3' },
      language_info: { name: 'python' }
    },
    nbformat: 4,
    nbformat_minor: 5
  };
}
