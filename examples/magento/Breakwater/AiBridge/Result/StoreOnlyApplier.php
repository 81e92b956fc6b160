<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Result;

use Breakwater\AiBridge\Api\AnswerApplierInterface;

/**
 * The default applier: the answer is only kept in the pending row (state "applied",
 * result). Replace it (di.xml preference) with the shop's own use of the answer.
 */
class StoreOnlyApplier implements AnswerApplierInterface
{
    public function apply(ResultMessage $result, ?array $pendingRow): void
    {
    }
}
